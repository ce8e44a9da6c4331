"""Unit tests of the wire protocol (client/protocol.py), the client's frame-size check
against the server's limit (client/base.py) and error rebuilding."""

from __future__ import annotations

import contextlib
import fractions

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wkr_serving.client import errors as E
from wkr_serving.client import protocol as P
from wkr_serving.client.base import check_frame_sizes, request_frames

DTYPES = ["float32", "float64", "int8", "int64", "uint16", "bool", "complex64", "<M8[s]",
          "S5", "<U3"]
SHAPES = [(), (4,), (3, 5), (2, 3, 4), (0,)]


def sample(dtype: str, shape: tuple) -> np.ndarray:
    n = int(np.prod(shape))
    base = np.arange(1, n + 1)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        arr = (base % 3 == 0)
    elif dt.kind == "c":
        arr = (base + 0.5j * base).astype(dt)
    elif dt.kind in "SU":
        arr = np.array([str(i)[:3] for i in base], dtype=dt)
    else:
        arr = (base - n // 2).astype(dt) if dt.kind in "fi" else base.astype(dt)
    return arr.reshape(shape)


def roundtrip(value, protocol):
    meta, buf = P.encode_item(value, protocol)
    # Simulate the wire: metas travel in a msgpack header, buffers as raw bytes.
    meta = msgpack.unpackb(P.pack([meta]), raw=False)[0]
    return P.decode_item(meta, bytes(memoryview(buf)))


@pytest.mark.parametrize("protocol", P.PROTOCOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_array_roundtrip(protocol, dtype, shape):
    value = sample(dtype, shape)
    got = roundtrip(value, protocol)
    assert isinstance(got, np.ndarray)
    assert got.dtype == value.dtype and got.shape == value.shape
    np.testing.assert_array_equal(got, value)


def test_non_contiguous_array_roundtrip():
    value = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2].T
    assert not value.flags.c_contiguous
    got = roundtrip(value, "numpy")
    np.testing.assert_array_equal(got, value)
    assert got.dtype == value.dtype


@pytest.mark.parametrize("value", [
    {"a": 1, "b": [1, 2, {"c": None}]},
    [[1, 2], [3, [4, [5]]], []],
    "héllo wörld",
    b"\x00\xff\x00binary\xff",
    None,
    0, -1, 2**63 - 1, -(2**63),
    3.25, -0.0, float("inf"),
    True,
    {},
    {1: "int key", "s": b"\x00"},
], ids=repr)
def test_obj_value_roundtrip(value):
    assert roundtrip(value, "obj") == value


def test_obj_dict_with_ndarrays_roundtrip():
    value = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "meta": {"y": np.array(True)},
             "list": [np.array([1, 2], dtype=np.uint16), "s"]}
    got = roundtrip(value, "obj")
    np.testing.assert_array_equal(got["x"], value["x"])
    assert got["x"].dtype == np.float32 and got["x"].shape == (2, 3)
    assert got["meta"]["y"].dtype == np.bool_ and got["meta"]["y"].shape == ()
    np.testing.assert_array_equal(got["list"][0], value["list"][0])
    assert got["list"][0].dtype == np.uint16 and got["list"][1] == "s"


def test_numpy_protocol_turns_plain_values_into_arrays():
    got = roundtrip([1.5, 2.5], "numpy")
    np.testing.assert_array_equal(got, np.asarray([1.5, 2.5]))
    assert got.dtype == np.asarray([1.5, 2.5]).dtype


def test_numpy_scalars_in_obj_values_become_python_numbers():
    got = roundtrip({"n": np.int32(7), "f": np.float64(0.5)}, "obj")
    assert got == {"n": 7, "f": 0.5}


@pytest.mark.parametrize("protocol", P.PROTOCOLS)
def test_object_dtype_is_refused(protocol):
    with pytest.raises(E.ProtocolError, match="object"):
        P.encode_item(np.array([{"a": 1}, None], dtype=object), protocol)


def test_object_dtype_inside_obj_value_is_refused():
    with pytest.raises(E.ProtocolError):
        P.encode_item({"x": np.array([1, "a"], dtype=object)}, "obj")


def test_unencodable_obj_value_raises_protocol_error():
    with pytest.raises(E.ProtocolError, match="obj"):
        P.encode_item(object(), "obj")


@pytest.mark.parametrize("dtype_str", ["|O", "V8", "not-a-dtype", 5, "x" * 40,
                                       "[('a', '<i4')]"])
def test_decode_refuses_bad_dtypes(dtype_str):
    with pytest.raises(E.ProtocolError):
        P.decode_item([dtype_str, [1]], b"\x00" * 8)


@pytest.mark.parametrize("shape,nbytes", [([3], 8), ([2, 2], 12), ([], 0), ([0], 4)])
def test_shape_buffer_mismatch_raises(shape, nbytes):
    with pytest.raises(E.ProtocolError, match="bytes"):
        P.decode_item(["<i4", shape], b"\x01" * nbytes)


@pytest.mark.parametrize("shape", [[-1], [1.5], ["2"], 3, None, [True]])
def test_bad_shape_raises(shape):
    with pytest.raises(E.ProtocolError):
        P.decode_item(["<i4", shape], b"\x00" * 4)


@pytest.mark.parametrize("meta", [1, "x", [1], [1, 2, 3], {"a": 1}])
def test_bad_meta_raises(meta):
    with pytest.raises(E.ProtocolError):
        P.decode_item(meta, b"\x00" * 4)


@pytest.mark.parametrize("meta", [[["<i4"], [1]], [{"d": "<i4"}, [1]]])
def test_unhashable_dtype_in_meta_raises_protocol_error(meta):
    """A client controls item metas: a list or map where the dtype string belongs must be a
    ProtocolError (the worker only catches ProtocolError while decoding a batch)."""
    with pytest.raises(E.ProtocolError):
        P.decode_item(meta, b"\x00" * 4)


def test_garbage_msgpack_item_raises():
    with pytest.raises(E.ProtocolError):
        P.decode_item(0, b"\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(E.ProtocolError):
        P.decode_item(0, b"\x92\x01")  # truncated array


def test_unknown_msgpack_extension_raises():
    packed = msgpack.packb(msgpack.ExtType(42, b"data"))
    with pytest.raises(E.ProtocolError, match="extension"):
        P.decode_item(0, packed)


def test_malformed_ndarray_extension_raises():
    packed = msgpack.packb(msgpack.ExtType(P.EXT_NDARRAY, b"\xc1garbage"))
    with pytest.raises(E.ProtocolError):
        P.decode_item(0, packed)
    lying = msgpack.packb(msgpack.ExtType(
        P.EXT_NDARRAY, msgpack.packb(["<f8", [4], b"\x00" * 8], use_bin_type=True)))
    with pytest.raises(E.ProtocolError, match="bytes"):
        P.decode_item(0, lying)


# -- headers ----------------------------------------------------------------------------


def test_header_roundtrip_for_every_kind():
    for kind, fields in P.HEADER_FIELDS.items():
        header = [P.PROTOCOL_VERSION, kind, *range(fields)]
        assert P.unpack_header(P.pack(header)) == header
        assert P.unpack_header(P.pack(header), expect=kind) == header


def test_header_expect_mismatch_raises():
    header = P.pack([P.PROTOCOL_VERSION, P.HELLO, 1])
    with pytest.raises(E.ProtocolError, match="unexpected"):
        P.unpack_header(header, expect=P.REQUEST)


def test_wrong_version_raises():
    header = P.pack([P.PROTOCOL_VERSION + 1, P.HELLO, 1])
    with pytest.raises(E.ProtocolError, match="version"):
        P.unpack_header(header)


@pytest.mark.parametrize("kind", [0, 99, "REQUEST", None, 1.0])
def test_unknown_kind_raises(kind):
    with pytest.raises(E.ProtocolError, match="kind"):
        P.unpack_header(P.pack([P.PROTOCOL_VERSION, kind, 1]))


def test_wrong_field_count_raises():
    with pytest.raises(E.ProtocolError, match="fields"):
        P.unpack_header(P.pack([P.PROTOCOL_VERSION, P.REQUEST, 1, 0]))
    with pytest.raises(E.ProtocolError, match="fields"):
        P.unpack_header(P.pack([P.PROTOCOL_VERSION, P.HELLO, 1, 2]))


@pytest.mark.parametrize("buf", [b"", b"\xc1", b"\x93\x01", b"garbage!", P.pack({"a": 1}),
                                 P.pack([1]), P.pack("str"), P.pack(None)])
def test_truncated_or_garbage_header_raises(buf):
    with pytest.raises(E.ProtocolError):
        P.unpack_header(buf)


def test_truncated_valid_header_raises():
    good = P.pack([P.PROTOCOL_VERSION, P.REQUEST, 1, 0, [["<f4", [4]]]])
    for cut in range(len(good)):
        with pytest.raises(E.ProtocolError):
            P.unpack_header(good[:cut])


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_protocol_error(buf):
    try:
        header = P.unpack_header(buf)
    except E.ProtocolError:
        return
    assert isinstance(header, list) and header[0] == P.PROTOCOL_VERSION


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                     st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_values, max_size=7))
def test_random_msgpack_headers_only_raise_protocol_error(fields):
    for prefix in ([], [P.PROTOCOL_VERSION], [P.PROTOCOL_VERSION, P.REQUEST]):
        with contextlib.suppress(E.ProtocolError):
            P.unpack_header(P.pack(prefix + fields))


@settings(max_examples=300, deadline=None, database=None)
@given(meta=_values, buf=st.binary(max_size=64))
def test_random_item_meta_only_raises_protocol_error(meta, buf):
    with contextlib.suppress(E.ProtocolError):
        P.decode_item(meta, buf)


@settings(max_examples=200, deadline=None, database=None)
@given(_values)
def test_obj_values_roundtrip_property(value):
    assert roundtrip(value, "obj") == value


# -- errors on the wire -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [E.ModelError, E.BadInput, E.UnknownCommand,
                                 E.DeadlineExceeded, E.Overloaded, E.WorkerDied,
                                 E.ShuttingDown, E.ServerError])
def test_error_wire_roundtrip(cls):
    wire = msgpack.unpackb(P.pack(cls("msg", "tb text").to_wire()), raw=False)
    rebuilt = E.error_from_wire(wire, request_id=3)
    assert type(rebuilt) is cls
    assert rebuilt.message == "msg" and rebuilt.traceback == "tb text"
    assert rebuilt.request_id == 3
    assert "tb text" in str(rebuilt)


def test_malformed_error_info_is_a_plain_server_error():
    rebuilt = E.error_from_wire(["only", "two"])
    assert type(rebuilt) is E.ServerError and "malformed" in rebuilt.message
    assert type(E.error_from_wire([1, "m", ""])) is E.ServerError


def test_exception_hierarchy():
    assert issubclass(E.ConnectTimeout, E.WKRTimeoutError)
    assert issubclass(E.WKRTimeoutError, TimeoutError)
    assert issubclass(E.UnknownCommand, E.BadInput)
    assert issubclass(E.ModelError, E.ServerError) and issubclass(E.ServerError, E.WKRError)


# -- frame sizes (client/base.py), opt-in pickle, item metas --------------------------------


def test_frame_size_check_refuses_items_over_the_servers_limit():
    frames = request_frames(1, 1000, [np.zeros(100, np.uint8)], "numpy")
    check_frame_sizes(frames, {"max_msg_size": 100})
    check_frame_sizes(frames, {"max_msg_size": -1})
    check_frame_sizes(frames, {})
    with pytest.raises(E.ClientUsageError, match="max_msg_size of 99 bytes"):
        check_frame_sizes(frames, {"max_msg_size": 99})


def test_pickle_only_when_both_sides_opt_in():
    value = fractions.Fraction(1, 3)
    with pytest.raises(E.ProtocolError, match="cannot encode"):
        P.encode_item(value, "obj")
    meta, buf = P.encode_item(value, "obj", allow_pickle=True)
    assert meta == P.PICKLE_ITEM
    with pytest.raises(E.ProtocolError, match="pickled item refused"):
        P.decode_item(meta, buf)
    assert P.decode_item(meta, buf, allow_pickle=True) == value
    # msgpack-able values never become pickles, even when allowed
    assert P.encode_item({"a": 1}, "obj", allow_pickle=True)[0] == P.MSGPACK_ITEM


def test_garbage_pickle_is_a_protocol_error():
    with pytest.raises(E.ProtocolError, match="not a valid pickle"):
        P.decode_item(P.PICKLE_ITEM, b"\x80\x05garbage", allow_pickle=True)
    with pytest.raises(E.ProtocolError):
        P.decode_item(True, b"\x00")  # a bool is not the pickle meta


def test_check_metas_bounds_what_a_client_can_nest():
    P.check_metas([0, 1, ["<f4", [2, 3]], ["|u1", []]])
    P.check_metas([["<f4", [1] * P.MAX_NDIM]])
    for bad in (["<f4", [1] * (P.MAX_NDIM + 1)], ["<f4", [[1]]], [b"<f4", [1]], 2, True,
                ["<f4", (1,)], {"dtype": "<f4"}, ["<f4", [1], "extra"]):
        with pytest.raises(E.ProtocolError, match="item meta"):
            P.check_metas([0, bad])
