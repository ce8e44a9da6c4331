"""Round trips through real servers for both protocols, batches and pipelining."""

from __future__ import annotations

import numpy as np
import pytest
from wkr_serving.client import Response

DTYPES = ["float32", "float64", "int8", "int64", "uint16", "bool", "complex64"]
SHAPES = [(), (4,), (3, 5), (2, 3, 4), (0,)]


def sample(dtype: str, shape: tuple, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        arr = rng.integers(0, 2, size=shape).astype(bool)
    elif dt.kind == "c":
        arr = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    elif dt.kind == "f":
        arr = rng.standard_normal(shape).astype(dt)
    else:
        info = np.iinfo(dt)
        arr = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return np.asarray(arr, dtype=dt).reshape(shape)


def assert_same_array(got, want):
    assert isinstance(got, np.ndarray), f"expected an ndarray, got {type(got).__name__}"
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def assert_same_items(got, want):
    """Results equal their inputs, one by one: arrays exactly (dtype, shape), else ==."""
    assert len(got) == len(want)
    for g, x in zip(got, want, strict=True):
        if isinstance(x, np.ndarray):
            assert_same_array(g, x)
        else:
            assert g == x


@pytest.fixture(params=["obj", "numpy"])
def any_client(request, client_factory):
    server = request.getfixturevalue(f"{request.param}_server")
    return client_factory(server)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_array_roundtrip(any_client, dtype, shape):
    x = sample(dtype, shape)
    assert_same_array(any_client.encode(x), x)


def test_arrays_of_every_dtype_and_shape_in_one_batch(any_client):
    """Mixed dtypes and shapes in one request (the worker cannot stack them)."""
    xs = [sample(d, s, seed=i) for i, (d, s) in enumerate(
        (d, s) for d in DTYPES for s in SHAPES)]
    got = any_client.encode_batch(xs)
    assert len(got) == len(xs)
    for g, x in zip(got, xs, strict=True):
        assert_same_array(g, x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_same_shape_items_are_stacked_and_split_back(numpy_client, shape):
    """Items of one dtype and shape reach predict stacked; results come back per item."""
    xs = [sample("float32", shape, seed=i) for i in range(6)]  # > batch_size 4
    got = numpy_client.encode_batch(xs)
    assert len(got) == len(xs)
    for g, x in zip(got, xs, strict=True):
        assert_same_array(g, x)


OBJ_VALUES = [
    {"a": 1, "b": "two", "c": [3.5, None]},
    [[1, 2, [3, [4, []]]], ["x", {"y": [True, False]}]],
    "plain string",
    "ünïcødé ✓",
    "",
    b"\x00\xff\x00\xfe binary \xff\x00",
    b"",
    None,
    0,
    -7,
    2**63 - 1,
    -(2**63),
    3.141592653589793,
    -1e-300,
    float("inf"),
    True,
    False,
    [],
    {},
]


@pytest.mark.parametrize("value", OBJ_VALUES, ids=repr)
def test_obj_value_roundtrip(obj_client, value):
    got = obj_client.encode(value)
    assert got == value
    assert type(got) is type(value)


def test_obj_dict_containing_ndarrays(obj_client):
    value = {"emb": sample("float32", (3, 5)), "ids": sample("int64", (4,)),
             "nested": {"mask": sample("bool", (2, 3, 4)), "z": sample("complex64", ())},
             "empty": sample("uint16", (0,)), "label": "x"}
    got = obj_client.encode(value)
    assert set(got) == set(value)
    assert got["label"] == "x"
    assert_same_array(got["emb"], value["emb"])
    assert_same_array(got["ids"], value["ids"])
    assert_same_array(got["nested"]["mask"], value["nested"]["mask"])
    assert_same_array(got["nested"]["z"], value["nested"]["z"])
    assert_same_array(got["empty"], value["empty"])


def test_obj_all_values_in_one_request(obj_client):
    got = obj_client.encode_batch(OBJ_VALUES)
    assert got == OBJ_VALUES


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 64])
def test_encode_batch_keeps_order_across_batches(any_client, n):
    """A request larger than -batch_size (4) is split over batches and reassembled."""
    if any_client.protocol == "numpy":
        xs = [np.full((3,), i, dtype=np.int64) for i in range(n)]
    else:
        xs = [{"i": i, "tag": f"item-{i}"} for i in range(n)]
    assert_same_items(any_client.encode_batch(xs), xs)


def test_encode_batch_accepts_an_ndarray(numpy_client):
    xs = sample("int8", (9, 2, 3))
    got = numpy_client.encode_batch(xs)
    assert len(got) == 9
    for g, x in zip(got, xs, strict=True):
        assert_same_array(g, x)


def test_pipelined_fetch_all_in_send_order(any_client):
    n = 1000
    if any_client.protocol == "numpy":
        xs = [np.array([i, -i], dtype=np.int64) for i in range(n)]
    else:
        xs = [{"seq": i} for i in range(n)]
    ids = [any_client.encode(x, blocking=False) for x in xs]
    assert len(set(ids)) == n
    assert_same_items(any_client.fetch_all(), xs)
    assert any_client.fetch_all() == [], "every reply was already fetched"


def test_fetch_yields_responses_in_send_order(obj_client):
    xs = [f"value-{i}" for i in range(50)]
    ids = [obj_client.encode(x, blocking=False) for x in xs]
    responses = list(obj_client.fetch())
    assert [r.id for r in responses] == ids
    for r, x in zip(responses, xs, strict=True):
        assert isinstance(r, Response)
        assert r.error_code == 0 and r.error_message == ""
        assert r.embedding == x and r.result == x


def test_fetch_all_with_return_id(obj_client):
    xs = list(range(20))
    ids = [obj_client.encode(x, blocking=False) for x in xs]
    assert obj_client.fetch_all(return_id=True) == list(zip(ids, xs, strict=True))


def test_encode_async_yields_in_order(any_client):
    n = 300
    if any_client.protocol == "numpy":
        def gen():
            for i in range(n):
                yield np.array([i], dtype=np.int64)
    else:
        def gen():
            for i in range(n):
                yield {"g": i}

    responses = list(any_client.encode_async(gen(), max_in_flight=32))
    assert len(responses) == n
    assert [r.id for r in responses] == sorted(r.id for r in responses)
    for r, x in zip(responses, gen(), strict=True):
        assert r.error_code == 0
        if isinstance(x, np.ndarray):
            assert_same_array(r.embedding, x)
        else:
            assert r.embedding == x


def test_encode_async_max_num_batch(obj_client):
    responses = list(obj_client.encode_async(iter(range(100)), max_num_batch=7))
    assert [r.embedding for r in responses] == list(range(7))
