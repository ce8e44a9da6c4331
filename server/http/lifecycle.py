"""The model's lifecycle over HTTP: describe it, try it, predict, evaluate, switch it.

Routes in the style of the prediction-log pattern (``/health``, ``/label``,
``/predict``, ``/predict/test``; ``/metadata`` is a core route, :mod:`.app`):

- ``GET /health``: the live and ready checks in one, for probes that expect one route:
  200 ``{"health": "ok"}`` when every worker has its model and the pipeline answers,
  else 503 ``{"health": "not ready", "reason": ...}``. Open without the token.
- ``GET /label``: the model's labels (``get_metadata()["labels"]``) as an object from
  class index to name (a list ``["a", "b"]`` becomes ``{"0": "a", "1": "b"}``); 404 when
  the model declares none.
- ``GET /predict/test``: the model's ``data_sample`` (``get_metadata()``, a list of
  inputs) computed by the model, answered like ``/predict``; 404 when it declares none.
- ``POST /predict``: ``{"data": [input, ...]}`` (plus ``/encode``'s ``"dtype"``,
  ``"timeout"``, ``"suppress_log_input"``), computed like ``/encode`` with its limits and
  errors. One input: ``{"job_id": <request id>, "prediction": <result>, ...}``; several:
  ``{"job_id": ..., "results": [{"prediction": ..., ...}, ...]}`` in input order. A
  result that is a mapping with a ``"prediction"`` key is flattened: its other keys
  (``is_outlier``, ``outlier_score``...) stand beside ``prediction``; any other result is
  ``{"prediction": result}``. ``job_id`` is the request id (``X-Request-ID``), which the
  prediction log also records.
- ``POST /evaluate``: the model's predictions scored against labels
  (``WKRClient.evaluate``): a JSON body ``{"inputs": [...], "labels": [...], "details":
  false}`` (optional ``"chunk_size"``, ``"timeout"`` per chunk in ms, ``"dtype"``), or a
  ``multipart/form-data`` upload: a ``file`` (CSV with a header row, or JSON lines) and
  the fields ``label_column``, optional ``format`` (``csv`` or ``jsonl``; else from the
  file's name), ``details``, ``chunk_size``, ``timeout``, ``dtype``; or the file itself as
  the body (``Content-Type: text/csv`` or ``application/x-ndjson``) with those fields
  as query parameters. Answers the metrics; a malformed file (the line is named) or
  inputs and labels of different lengths get 400.

Model repository (Triton's API, with v2 error bodies ``{"error": ...}``):

- ``GET`` or ``POST /v2/repository/index``: ``[{"name", "version", "state", "reason"}]``:
  the served model ``READY`` (``LOADING`` while the server starts, ``UNAVAILABLE`` while
  it stops); during a switch its target ``LOADING``; after a failed switch the target
  ``UNAVAILABLE`` with the reason. ``{"ready": true}`` keeps only the ``READY`` ones.
- ``POST /v2/repository/models/{name}/load``: switch the served model to ``name``
  (optional body ``{"parameters": {"model_dir": ..., "version": ...}}``; what it does
  not give stays as it is), rolling, with no request lost; answers when the switch is
  done (200 with the switch's report) or failed (409, the old model keeps serving).
- ``POST /v2/repository/models/{name}/unload``: 400: the server always serves a model;
  load another to switch.

Who may switch: with ``-http_token``, whoever has it (the front checks it on every
route); without it, callers on the bridge's own host (loopback peers), or a caller
sending ``Authorization: Bearer <-auth_token>`` (the server's control token); anyone
else gets 403. The bridge passes the server's ``-auth_token`` to the server.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException
from wkr_serving.client import errors as E
from wkr_serving.client.access import is_local

from . import jsonio
from .app import (
    Backend,
    EncodeCall,
    as_input,
    check_decoded_size,
    dtype_of,
    envelope,
    error_code,
    failure,
    http_status,
    is_ready,
    parse_encode_body,
    run_encode,
)
from .auth import bearer_ok
from .v2codec import MODEL_VERSION

__all__ = ["control_refusal", "prediction_answer", "register", "repository_index"]

#: What a load request's ``parameters`` may set.
LOAD_PARAMETERS = ("model_dir", "version")
#: File formats ``POST /evaluate`` reads, by the body's media type (the file sent as
#: the body).
MEDIA_FORMATS = {"text/csv": "csv", "application/x-ndjson": "jsonl",
                 "application/jsonl": "jsonl", "application/json-lines": "jsonl"}
#: Seconds ``POST /evaluate`` waits beyond the time its calls may take.
EVALUATE_SLACK_S = 30.0


def _answer(status: int, payload: dict[str, Any]) -> Any:
    return jsonify(payload), status


def _error(status: int, code: str, message: str) -> Any:
    return _answer(*envelope(status, code, message))


def _v2(body: Any, status: int = 200) -> Response:
    return Response(jsonio.dumps(body), status, mimetype="application/json")


def _v2_error(status: int, message: str) -> Response:
    return _v2({"error": message}, status)


# -- describing the model -------------------------------------------------------------------

def labels_object(labels: Any) -> dict[str, Any] | None:
    """``labels`` as ``{"<index>": name}`` (None when there are none)."""
    if isinstance(labels, dict):
        return {str(k): v for k, v in labels.items()} or None
    if isinstance(labels, (list, tuple)) and labels:
        return {str(i): name for i, name in enumerate(labels)}
    return None


def prediction_fields(result: Any) -> dict[str, Any]:
    """One result as ``{"prediction": ..., <extra fields>}`` (see the module docstring)."""
    if isinstance(result, dict) and "prediction" in result:
        return {str(k): v for k, v in result.items()}
    return {"prediction": result}


def prediction_answer(job_id: str, results: list[Any]) -> dict[str, Any]:
    """The body of ``/predict`` and ``/predict/test`` for ``results`` (in input order)."""
    if len(results) == 1:
        return {**prediction_fields(results[0]), "job_id": job_id}
    return {"job_id": job_id, "results": [prediction_fields(r) for r in results]}


def _sample_dtype(meta: dict[str, Any]) -> np.dtype | None:
    """The numpy dtype named by the metadata's ``data_type``, if it names one."""
    name = meta.get("data_type")
    if not isinstance(name, str) or len(name) > 32:
        return None
    try:
        return np.dtype(name)
    except TypeError:
        return None


# -- evaluation -------------------------------------------------------------------------------

class EvaluateCall:
    """What a ``POST /evaluate`` asks for."""

    def __init__(self, inputs: list[Any], labels: list[Any], details: bool,
                 chunk_size: int | None, timeout: int | None) -> None:
        self.inputs = inputs
        self.labels = labels
        self.details = details
        self.chunk_size = chunk_size
        self.timeout = timeout


def _positive_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f'"{name}" must be a positive int, not {value!r}') from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'"{name}" must be a positive int')
    return value


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                     "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f'"{name}" must be a boolean')


def _dtype(value: Any) -> np.dtype | None:
    """An optional ``dtype`` field: ``""`` (an empty form field) is none, as is None."""
    return None if value == "" else dtype_of(value)


def _inputs_for(backend: Backend, inputs: list[Any], dtype: np.dtype | None) -> list[Any]:
    """Inputs as the server's protocol wants them, each within ``-max_msg_size``."""
    if backend.protocol != "numpy" and dtype is None:
        return inputs
    limit = backend.limits.max_bytes
    out = []
    for index, item in enumerate(inputs):
        if limit > 0:
            try:
                check_decoded_size([item], dtype, limit)
            except ValueError as exc:
                raise ValueError(f"input {index}: {exc}") from None
        out.append(as_input(item, backend.protocol, dtype))
    return out


def _from_fields(backend: Backend, fields: Any, data: bytes, fmt: str | None,
                 ) -> EvaluateCall:
    """An evaluation of a file's rows (``fields``: the form or the query parameters)."""
    from wkr_serving.client.evalfile import FORMATS, read_table

    label_column = fields.get("label_column")
    if not label_column:
        raise ValueError('an evaluation file needs the "label_column" field (the column '
                         'holding the expected labels)')
    fmt = fields.get("format") or fmt
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f'"format" must be one of {sorted(FORMATS)}, not {fmt!r}')
    inputs, labels = read_table(data, label_column, fmt)
    return EvaluateCall(_inputs_for(backend, list(inputs), _dtype(fields.get("dtype"))),
                        list(labels), _flag(fields.get("details"), "details"),
                        _positive_int(fields.get("chunk_size"), "chunk_size"),
                        _positive_int(fields.get("timeout"), "timeout"))


def read_evaluation(backend: Backend) -> EvaluateCall:
    """The evaluation the current request asks for; ValueError (and the evaluation
    file's own error, a ``ClientUsageError``) says what is wrong."""
    media = request.mimetype
    if media == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise ValueError('the upload needs a "file" field (a CSV or JSON-lines file)')
        from wkr_serving.client.evalfile import guess_format

        guess = guess_format(upload.filename) if upload.filename else None
        return _from_fields(backend, request.form, upload.read(), guess)
    if media in MEDIA_FORMATS:
        return _from_fields(backend, request.args, request.get_data(cache=False),
                            MEDIA_FORMATS[media])
    body = jsonio.loads(request.get_data(cache=False))
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object {"inputs": [...], "labels": [...]} '
                         'or a multipart upload of a file')
    inputs, labels = body.get("inputs"), body.get("labels")
    if not isinstance(inputs, list) or not inputs:
        raise ValueError('"inputs" must be a non-empty list of inputs')
    if not isinstance(labels, list):
        raise ValueError('"labels" must be a list (one label per input)')
    if len(inputs) != len(labels):
        raise ValueError(f'"inputs" has {len(inputs)} items but "labels" has {len(labels)}: '
                         "give one label per input")
    unknown = sorted(set(body) - {"inputs", "labels", "details", "chunk_size", "timeout",
                                  "dtype"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}: an evaluation takes inputs, labels, "
                         "details, chunk_size, timeout, dtype")
    return EvaluateCall(_inputs_for(backend, inputs, _dtype(body.get("dtype"))), labels,
                        _flag(body.get("details"), "details"),
                        _positive_int(body.get("chunk_size"), "chunk_size"),
                        _positive_int(body.get("timeout"), "timeout"))


def evaluate_wait(backend: Backend, call: EvaluateCall) -> float:
    """Seconds the route waits for an evaluation at most: each of its calls is bounded
    by its own timeout; this bounds the whole in case something else goes wrong."""
    from wkr_serving.client.evaluation import DEFAULT_CHUNK_SIZE

    per_call = (call.timeout or backend.options["timeout"]) / 1000.0
    chunk = min(call.chunk_size or DEFAULT_CHUNK_SIZE, max(1, backend.limits.max_items))
    calls = math.ceil(len(call.inputs) / chunk) + 2  # the chunks, evaluate, metadata
    return per_call * calls + EVALUATE_SLACK_S


# -- switching --------------------------------------------------------------------------------

def control_refusal(backend: Backend, peer: str | None, authorization: str | None,
                    ) -> str | None:
    """Why a request that changes the server (a switch) is refused; None: allowed.

    With ``-http_token`` the front has already checked the caller's token. Without it,
    a loopback peer, or the bearer token ``-auth_token``, is needed."""
    config = backend.config
    if config.http_token:
        return None
    if is_local(peer):
        return None
    if config.auth_token and bearer_ok(authorization, config.auth_token.encode()):
        return None
    return (f"switching models is only accepted from the bridge's own host (peer {peer}) "
            "unless the caller has the -http_token, or the server's -auth_token as "
            "Authorization: Bearer")


def load_parameters(raw: bytes) -> dict[str, str | None]:
    """The ``model_dir`` and ``version`` a load request body gives (V2-style errors as
    ValueError)."""
    if not raw.strip():
        return {}
    body = jsonio.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the load request body must be a JSON object")
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError('"parameters" must be a JSON object')
    if "config" in params or any(str(k).startswith("file:") for k in params):
        raise ValueError("model configuration and file overrides are not supported: give "
                         '"parameters": {"model_dir": ..., "version": ...}')
    unknown = sorted(str(k) for k in params if k not in LOAD_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown load parameter(s) {unknown}: this server takes "
                         f"{list(LOAD_PARAMETERS)}")
    out: dict[str, str | None] = {}
    for key in LOAD_PARAMETERS:
        value = params.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f'"{key}" must be a non-empty string')
        out[key] = value
    return out


def _v2_version(version: Any) -> str:
    return str(version) if version else MODEL_VERSION


def repository_index(backend: Backend, status: dict[str, Any]) -> list[dict[str, str]]:
    """The v2 repository index from a ``server_status`` snapshot (see the module
    docstring)."""
    model = status.get("model") or {}
    name = str(model.get("name") or backend.default_model_name())
    state, reason = "READY", ""
    if status.get("draining"):
        state, reason = "UNAVAILABLE", "the server is shutting down"
    elif not status.get("ready"):
        state, reason = "LOADING", "workers are loading the model"
    rows = [{"name": name, "version": _v2_version(model.get("version")), "state": state,
             "reason": reason}]
    switch = status.get("switch")
    if isinstance(switch, dict) and switch.get("state") in ("switching", "failed"):
        target = switch.get("to") or {}
        row = {"name": str(target.get("name") or name),
               "version": _v2_version(target.get("version")), "state": "LOADING",
               "reason": ""}
        if switch["state"] == "failed":
            row.update(state="UNAVAILABLE", reason=str(switch.get("error") or "failed"))
        rows.append(row)
    return rows


# -- routes -----------------------------------------------------------------------------------

def register(app: Flask, backend: Backend) -> None:
    """Serve the lifecycle routes (see the module docstring) on ``app``."""

    def model_metadata() -> dict[str, Any]:
        meta = backend.metadata().get("metadata")
        return meta if isinstance(meta, dict) else {}

    @app.get("/health")
    def health() -> Any:
        ok, why = is_ready(backend)
        if ok:
            return _answer(200, {"health": "ok"})
        return _answer(503, {"health": "not ready", "reason": why})

    @app.get("/label")
    def label() -> Any:
        try:
            labels = labels_object(model_metadata().get("labels"))
        except Exception as exc:
            return _answer(*failure(exc))
        if labels is None:
            return _error(404, "no_labels", "the model declares no labels (its get_metadata() "
                                            'has no "labels")')
        return jsonify(labels)

    @app.get("/predict/test")
    def predict_test() -> Any:
        try:
            meta = model_metadata()
        except Exception as exc:
            return _answer(*failure(exc))
        samples = meta.get("data_sample")
        if samples is None:
            return _error(404, "no_data_sample", "the model declares no data_sample (its "
                                                 'get_metadata() has no "data_sample")')
        if not isinstance(samples, list) or not samples:
            return _error(500, "bad_metadata", "the model's data_sample must be a non-empty "
                                               f"list of inputs, not {type(samples).__name__}")
        dtype = _sample_dtype(meta)
        try:
            items = [as_input(s, backend.protocol, dtype) for s in samples]
            call = EncodeCall(items, False, None, False)
            results = run_encode(backend, call, g.request_id)
        except Exception as exc:
            return _answer(*failure(exc))
        return jsonify(prediction_answer(g.request_id, results))

    @app.post("/predict")
    def predict() -> Any:
        try:
            body = jsonio.loads(request.get_data(cache=False))
            if not isinstance(body, dict) or "data" not in body or "batch" in body:
                raise ValueError('the body must be a JSON object {"data": [input, ...]}')
            data = body["data"]
            if not isinstance(data, list) or not data:
                raise ValueError('"data" must be a non-empty list of inputs')
            call = parse_encode_body({**{k: v for k, v in body.items() if k != "data"},
                                      "batch": data}, backend.protocol, backend.limits)
        except ValueError as exc:
            return _error(400, "bad_input", str(exc))
        except Exception as exc:  # an input the protocol cannot take (BadInput)
            return _answer(*failure(exc))
        try:
            results = run_encode(backend, call, g.request_id)
        except Exception as exc:
            return _answer(*failure(exc))
        return jsonify(prediction_answer(g.request_id, results))

    @app.post("/evaluate")
    def evaluate() -> Any:
        try:
            call = read_evaluation(backend)
        except (ValueError, E.ClientUsageError) as exc:
            return _error(400, "bad_input", str(exc))
        except HTTPException:  # the upload's own limits (413...): Flask's handler
            raise
        except Exception as exc:  # an input the protocol cannot take (BadInput)
            return _answer(*failure(exc))
        try:
            result = backend.evaluate(call.inputs, call.labels, call.details,
                                      call.chunk_size, call.timeout,
                                      evaluate_wait(backend, call))
        except Exception as exc:
            return _answer(*failure(exc))
        return jsonify(result)

    @app.get("/v2/repository/index")
    @app.post("/v2/repository/index")
    def repository() -> Response:
        ready_only = False
        raw = request.get_data(cache=False)
        if raw.strip():
            try:
                body = jsonio.loads(raw)
            except ValueError as exc:
                return _v2_error(400, str(exc))
            if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
                return _v2_error(400, 'the index request body must be {"ready": true|false}')
            ready_only = body.get("ready", False)
        try:
            status = dict(backend.server_status())
        except Exception as exc:
            return _v2_error(http_status(exc), getattr(exc, "message", None) or str(exc))
        rows = repository_index(backend, status)
        if ready_only:
            rows = [r for r in rows if r["state"] == "READY"]
        return _v2(rows)

    @app.post("/v2/repository/models/<model>/load")
    def load(model: str) -> Response:
        refusal = control_refusal(backend, request.remote_addr,
                                  request.headers.get("Authorization"))
        if refusal is not None:
            return _v2({"error": refusal, **envelope(403, "forbidden", refusal)[1]}, 403)
        try:
            params = load_parameters(request.get_data(cache=False))
        except ValueError as exc:
            return _v2_error(400, str(exc))
        # the model served now, named after its worker class (it has no name of its
        # own): loading that name reloads it as it is, still without a name
        name: str | None = model
        if model == backend.default_model_name():
            with contextlib.suppress(Exception):
                if backend.metadata().get("model_name") is None:
                    name = None
        try:
            report = backend.switch_model(params.get("model_dir"), name,
                                          params.get("version"))
        except Exception as exc:
            app.logger.warning("switch to model %r failed: %s", model, exc)
            status = http_status(exc)
            message = getattr(exc, "message", None) or str(exc)
            return _v2({"error": message, **envelope(status, error_code(exc), message)[1]},
                       status)
        return _v2(report)

    @app.post("/v2/repository/models/<model>/unload")
    def unload(model: str) -> Response:
        return _v2_error(400, f"unloading is not supported: this server always serves one "
                              f"model; switch to another with POST /v2/repository/models/"
                              f"<name>/load (model {model!r} stays loaded if served)")
