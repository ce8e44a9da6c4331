"""Unit tests of the HTTP status each error class states (client/errors.py
``http_status``) and of the bridge's :func:`http_status`, which reads it: the status a
client sees over HTTP is decided where the error is defined."""

from __future__ import annotations

import pytest
from wkr_serving.client import errors as E
from wkr_serving.server.http.app import http_status

#: The status of every class in ``errors.__all__``. Listing them all here means a new
#: error class fails this test until someone decides (and writes down) its status.
EXPECTED = {
    "WKRError": 500,
    "ClientUsageError": 400,
    "ProtocolError": 400,
    "WKRTimeoutError": 504,
    "ConnectTimeout": 504,
    "ProtocolMismatch": 500,
    "VersionMismatch": 500,
    "ServerError": 500,
    "ModelError": 500,
    "BadInput": 400,
    "UnknownCommand": 400,
    "Unauthorized": 403,
    "ConnectionLost": 503,
    "DeadlineExceeded": 504,
    "Overloaded": 429,
    "WorkerDied": 500,
    "PoisonInput": 422,  # valid request, but the model cannot compute this input
    "ShuttingDown": 503,
    "SwitchFailed": 409,  # the server's state (a switch under way, a model that failed)
    "JobCancelled": 500,
    "DeadLettered": 500,
}

ERROR_CLASSES = {name: getattr(E, name) for name in E.__all__
                 if isinstance(getattr(E, name), type)}


def test_every_error_class_is_listed():
    assert set(ERROR_CLASSES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_error_class_states_an_int_http_status(name):
    cls = ERROR_CLASSES[name]
    status = cls.__dict__.get("http_status")  # its own, not only inherited
    assert type(status) is int and 400 <= status <= 599
    assert status == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bridge_status_is_the_class_attribute(name):
    cls = ERROR_CLASSES[name]
    assert http_status(cls("message")) == EXPECTED[name]
    if issubclass(cls, E.ServerError):  # as the bridge gets it: rebuilt from the wire
        assert http_status(E.error_from_wire([cls.code, "message", ""])) == EXPECTED[name]


def test_other_exceptions_are_500():
    assert http_status(ValueError("x")) == 500
    assert http_status(TimeoutError("x")) == 500
    assert http_status(KeyboardInterrupt()) == 500
