"""The Open Inference Protocol (KServe v2) REST API of the HTTP bridge.

Standard clients (``tritonclient.http``, KServe's ``InferenceRESTClient``, ``curl``) talk
to the server unchanged through these routes:

- ``GET /v2``: server metadata (``name``, ``version``, ``extensions``).
- ``GET /v2/health/live``, ``GET /v2/health/ready`` (200 when every worker has loaded its
  model and the pipeline answers, else 503).
- ``GET /v2/models/{name}[/versions/{v}]``: model metadata; ``.../ready``: model
  readiness; ``POST .../infer``: inference on typed tensors.

The server serves one model, named as the server says (``-model_name`` or the name a
switch gave it; without one, the last part of the worker class's name: ``EchoWorker``),
of version ``-model_version`` (or the switch's; ``"1"`` when none is set); another name
or version is a 404. Each bridge process asks the server at most once a second, and
again when a request names another model and what it knows is older than
:data:`RECHECK_S` (a switch may have just renamed it). The model
repository routes (``/v2/repository/...``: index, load to switch models, unload) are in
:mod:`.lifecycle`.

Inference: the first dimension of every input tensor is the batch. Each row becomes one
item for the server (``backend.encode``), so rows are batched with everybody else's
requests; results are stacked back into output tensors. One input is sent as its rows
(``-protocol numpy``: ndarrays; ``-protocol obj``: ndarrays for numeric tensors, ``str``
or ``bytes`` values, possibly in nested lists, for ``BYTES``); several inputs (``obj``
only) as one ``{input_name: row}`` dict per row. A model that returns a dict per row has
one output per key; otherwise its single output is ``OUTPUT0``, or the one name the
request asks for. The binary tensor extension (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data``, ``binary_data_output``) is supported both ways,
and gzip or deflate request bodies are inflated. A request's ``parameters.timeout``
(microseconds, as tritonclient sends it) becomes the call's deadline.

Limits (the server's options, see :mod:`.v2codec`), all checked before any array or row
is built: a batch over ``-max_request_items``, an input or a request decoding to more
than ``-max_msg_size``, data whose length is not what the shape says, or strict JSON it
is not (``NaN``, ``Infinity``, nesting deeper than 64 levels) is a 400; a compressed
body inflating past ``-http_max_body`` a 413. Answers are written by :mod:`.jsonio`
(non-finite output values in JSON become ``null``).

Model metadata describes the tensors of the latest requests this bridge process has
served (dims that differed between requests become ``-1``; the batch dim always is),
falling back on what ``/encode`` saw; before any request it declares one input
``INPUT0`` and one output ``OUTPUT0`` of shape ``[-1]`` (datatype ``FP32`` with
``-protocol numpy``, ``BYTES`` with ``obj``): a placeholder, the worker declares no
signature. This state is per bridge process (each process learns its own).

Errors have the v2 body ``{"error": message}`` and the status of
:func:`~.app.http_status`; every error response under ``/v2`` gets an ``"error"``
key, including the bearer-token refusal and unknown routes.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import numpy as np
from flask import Flask, Response, g, request
from wkr_serving.client.version import __version__

from . import jsonio
from .app import Backend, ModelInfo, http_status, is_ready
from .v2codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    MODEL_VERSION,
    PLATFORM,
    SERVER_NAME,
    Limits,
    Signature,
    V2Error,
    decode_input,
    encode_output,
    inflate,
    output_columns,
    parameters_of,
    plan_inputs,
    requested_outputs,
    rows_of,
    split_body,
    stack_rows,
    timeout_ms_of,
)

__all__ = ["model_name_of", "register", "version_of"]

#: Seconds: a request naming another model than the one this process knows asks the
#: server again if what it knows is older than this (a switch may have renamed it).
RECHECK_S = 0.1


def model_name_of(backend: Backend) -> str:
    """The served model's name: the server's (it changes with a switch), else
    ``-model_name``, else the last part of the worker class's name."""
    return backend.current_model().name


def version_of(info: ModelInfo) -> str:
    """The v2 version of the served model: its ``-model_version``, else ``"1"``."""
    return info.version or MODEL_VERSION


def limits_of(backend: Backend) -> Limits:
    """The server's limits on one inference request."""
    config = backend.config
    return Limits(max_items=config.max_request_items, max_bytes=config.max_msg_size,
                  max_body=config.http_max_body)


def read_body(limits: Limits) -> bytes:
    """The request body, inflated (to ``-http_max_body`` at most) when it is sent with
    gzip or deflate."""
    return inflate(request.get_data(cache=False), request.headers.get("Content-Encoding", ""),
                   limits.max_body)


def _json(body: Any, status: int = 200) -> Response:
    return Response(jsonio.dumps(body), status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def register(app: Flask, backend: Backend) -> None:
    """Serve the Open Inference Protocol REST routes on ``app``."""
    signature = Signature()
    limits = limits_of(backend)

    def check_model(model: str, version: str | None) -> ModelInfo:
        info = backend.current_model()
        if model != info.name:  # renamed by a switch a moment ago? ask the server
            info = backend.current_model(RECHECK_S)
        if model != info.name:
            raise V2Error(404, f"unknown model {model!r}: this server serves {info.name!r}")
        served = version_of(info)
        if version is not None and version != served:
            raise V2Error(404, f"model {info.name!r} has no version {version!r} (it serves "
                               f"version {served})")
        return info

    @app.errorhandler(V2Error)
    def v2_error(exc: V2Error) -> Response:
        return _error(exc.status, exc.message)

    @app.after_request
    def v2_error_body(response: Response) -> Response:
        """Every error under /v2 carries the v2 ``"error"`` key (token refusals, unknown
        routes and wrong methods come from elsewhere with other bodies)."""
        if response.status_code < 400 or not (request.path == "/v2"
                                               or request.path.startswith("/v2/")):
            return response
        body = response.get_json(silent=True) if response.is_json else None
        if isinstance(body, dict) and "error" in body:
            return response
        if isinstance(body, dict) and body.get("error_message"):
            message = str(body["error_message"])
        else:
            try:
                phrase = HTTPStatus(response.status_code).phrase
            except ValueError:
                phrase = "error"
            message = f"{response.status_code} {phrase}: {request.method} {request.path}"
        fixed = {"error": message, **body} if isinstance(body, dict) else {"error": message}
        response.set_data(jsonio.dumps(fixed))
        response.mimetype = "application/json"
        return response

    @app.get("/v2")
    def v2_server_metadata() -> Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/health/live")
    def v2_live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    def v2_ready() -> Response:
        ok, why = is_ready(backend)
        return _json({"ready": ok} if ok else {"ready": ok, "error": why}, 200 if ok else 503)

    @app.get("/v2/models/<model>")
    @app.get("/v2/models/<model>/versions/<version>")
    def v2_model_metadata(model: str, version: str | None = None) -> Response:
        info = check_model(model, version)
        inputs, outputs = signature.describe(backend)
        return _json({"name": info.name, "versions": [version_of(info)], "platform": PLATFORM,
                      "inputs": inputs, "outputs": outputs})

    @app.get("/v2/models/<model>/ready")
    @app.get("/v2/models/<model>/versions/<version>/ready")
    def v2_model_ready(model: str, version: str | None = None) -> Response:
        info = check_model(model, version)
        ok, why = is_ready(backend)
        body: dict[str, Any] = {"name": info.name, "ready": ok}
        if not ok:
            body["error"] = why
        return _json(body, 200 if ok else 503)

    @app.post("/v2/models/<model>/infer")
    @app.post("/v2/models/<model>/versions/<version>/infer")
    def v2_infer(model: str, version: str | None = None) -> Response:
        info = check_model(model, version)
        header, tail = split_body(read_body(limits), request.headers.get(HEADER_LENGTH))
        specs = header.get("inputs")
        if not isinstance(specs, list) or not specs:
            raise V2Error(400, "the inference request needs a non-empty list of inputs")
        params = parameters_of("request", header.get("parameters"))
        timeout = timeout_ms_of(params.get("timeout"))
        requested, binary = requested_outputs(header.get("outputs"),
                                               bool(params.get("binary_data_output", False)))
        plans = plan_inputs(specs, tail, limits)  # all checked before any is decoded
        if backend.protocol == "numpy" and len(plans) > 1:
            raise V2Error(400, f"this server (-protocol numpy) takes one input tensor, not "
                               f"{len(plans)}")
        tensors: list[tuple[str, str, np.ndarray]] = [
            (p.name, p.datatype, decode_input(p)) for p in plans]
        batch = tensors[0][2].shape[0]
        if len(tensors) == 1:
            items = rows_of(tensors[0][2], backend.protocol, limits.max_bytes)
        else:
            columns = [(n, rows_of(t, backend.protocol, limits.max_bytes))
                       for n, _, t in tensors]
            items = [{n: rows[i] for n, rows in columns} for i in range(batch)]
        try:
            results = backend.encode(items, timeout)
        except Exception as exc:  # the server's error, as an HTTP status
            raise V2Error(http_status(exc), getattr(exc, "message", None) or str(exc)
                          ) from None
        columns_out = output_columns(results, [n for n, _ in requested])
        chosen = requested or [(n, binary) for n in columns_out]
        outputs, raws = [], []
        described = []
        for output_name, as_binary in chosen:
            if output_name not in columns_out:
                raise V2Error(400, f"the model has no output {output_name!r} (it has "
                                   f"{list(columns_out)})")
            tensor = stack_rows(output_name, columns_out[output_name])
            entry, raw = encode_output(output_name, tensor, as_binary)
            outputs.append(entry)
            described.append((output_name, entry["datatype"], tuple(tensor.shape[1:])))
            if raw is not None:
                raws.append(raw)
        signature.update([(n, d, tuple(t.shape[1:])) for n, d, t in tensors], described)
        request_id = header.get("id")
        body = jsonio.dumps({"model_name": info.name, "model_version": version_of(info),
                             "id": request_id if isinstance(request_id, str)
                             else g.request_id, "outputs": outputs})
        if not raws:
            return Response(body, 200, mimetype="application/json")
        response = Response(b"".join([body, *raws]), 200, mimetype="application/octet-stream")
        response.headers[HEADER_LENGTH] = str(len(body))
        return response
