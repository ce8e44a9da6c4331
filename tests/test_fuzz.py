"""Property-based fuzzing of the public ports with hypothesis.

Thousands of random multipart messages (random frame counts and bytes, and "near-valid"
messages: msgpack headers with random versions, kinds, field counts and field values,
random item metas with random payload frames) are sent from a pool of bare DEALER pairs,
some with odd or random identities, without waiting for each reply. Afterwards:

- every message got exactly one reply (ERROR, RESULT or REPLY entries, counted across
  REPLIES messages): nothing was dropped or answered twice;
- no server process died or was restarted, and the server still answers a normal client
  (status and a correct roundtrip) within a few seconds.

Examples are derandomized (a fixed sequence per test), so a CI run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from helpers import RawClient, connect, gone, running_server, server_args, wait_idle, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wkr_serving.client import protocol as P
from wkr_serving.client.errors import BadInput, error_from_wire
from wkr_serving.server import WKRServer
from workers import EchoWorker

V = P.PROTOCOL_VERSION
LIMIT_S = 30.0  # for the final checks: thousands of replies on a slow shared box
SEND_LIMIT_MS = 10_000

FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.filter_too_much,
                                                HealthCheck.data_too_large])


# -- the server and the senders ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[WKRServer]:
    # -auth_token: a fuzzed "terminate" from this (loopback) host must not stop the server.
    args = server_args(tmp_path_factory.mktemp("fuzz_model"), "-protocol", "obj",
                       "-num_worker", "1", "-batch_size", "8", "-cpu", "-graceful_timeout",
                       "3", "-auth_token", "fuzz-token-never-guessed")
    with running_server(args, EchoWorker) as srv:
        yield srv


def _identities() -> list[bytes]:
    rng = random.Random(20240611)
    fixed = [b"fuzz-plain", b"#", b"@x#y", b"n\x00ul", b"\x00lead", b"\xff", b"\xff" * 255]
    randoms = [bytes(rng.randrange(1, 256) for _ in range(n)) for n in (1, 17, 255)]
    return list(dict.fromkeys(fixed + randoms))  # distinct: a duplicate would be ignored


@pytest.fixture(scope="module")
def pool(server) -> Iterator[list[RawClient]]:
    raws = [RawClient(server, identity) for identity in _identities()]
    yield raws
    for raw in raws:
        raw.close()


@pytest.fixture(scope="module")
def pids(server) -> dict[str, Any]:
    with connect(server) as client:
        return _processes(wait_until(lambda: (s := client.server_status)["ready"] and s,
                                     LIMIT_S, "the server to be ready"))


def _processes(status: dict[str, Any]) -> dict[str, Any]:
    return {"ventilator": status["ventilator_pid"], "sink": status["sink_pid"],
            "supervisor": status["supervisor_pid"],
            "workers": sorted(w["pid"] for w in status["workers"]),
            "restarts": [w["restarts"] for w in status["workers"]]}


class Tally:
    """Messages sent and replies received, over the pool."""

    def __init__(self, pool: list[RawClient], pids: dict[str, Any]) -> None:
        self.pool = pool
        self.live = [pids["ventilator"], pids["sink"], *pids["workers"]]
        self.sent = 0
        self.replies: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.unparsed_errors = 0  # errors with request id -1: the header could not be read
        self.next_id = 1_000_000
        self.recent: deque[str] = deque(maxlen=10)  # what was sent last, for a failure
        self.died_after: list[str] | None = None

    def fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def send(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        assert sock.poll(SEND_LIMIT_MS, zmq.POLLOUT), "the server stopped reading"
        sock.send_multipart(frames, zmq.NOBLOCK)
        self.sent += 1
        port = "port_out" if any(sock is r.from_sink for r in self.pool) else "port"
        identity = sock.getsockopt(zmq.IDENTITY)
        self.recent.append(f"{port} from {identity[:16]!r}: {[f[:80] for f in frames]!r}")

    def drain(self) -> None:
        """Read every reply already here, without waiting."""
        for raw in self.pool:
            while raw.from_sink.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._count(raw.from_sink.recv_multipart(zmq.NOBLOCK))

    def _count(self, frames: list[bytes]) -> None:
        header = P.unpack_header(frames[0])
        entries = (header[2] if header[1] == P.REPLIES
                   else [[header[2], header[1], header[3]]])
        for req_id, kind, body in entries:
            name = {P.ERROR: "error", P.RESULT: "result", P.REPLY: "reply"}[kind]
            self.replies[name] += 1
            if kind == P.ERROR:
                self.error_codes[error_from_wire(body).code] += 1
                self.unparsed_errors += req_id == -1

    def check_alive(self) -> None:
        dead = [pid for pid in self.live if gone(pid)]
        # A role dies a little after the message that killed it: the falsifying example
        # hypothesis shows is the one that noticed; the culprit is among the last ones.
        if dead and self.died_after is None:  # keep the first report: shrinking sends more
            self.died_after = list(self.recent)
        assert not dead, f"server processes {dead} died; last messages sent:\n" + "\n".join(
            self.died_after or [])

    def settle(self) -> None:
        """Wait until every message sent got its reply."""
        def done() -> bool:
            self.drain()
            return sum(self.replies.values()) >= self.sent

        try:
            wait_until(done, LIMIT_S, "a reply to every fuzzed message")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.sent} sent, replies {dict(self.replies)}"
                                 ) from None
        assert sum(self.replies.values()) == self.sent, (
            f"{self.sent} messages sent but replies {dict(self.replies)}")


def assert_still_serves(server: WKRServer, pids: dict[str, Any]) -> dict[str, Any]:
    with connect(server, timeout=5000) as client:
        values = ["x", {"a": [1, 2.5, None]}, b"\x00\xff", list(range(10))]
        assert client.encode_batch(values) == values
        array = np.arange(12, dtype="<f4").reshape(3, 4)
        np.testing.assert_array_equal(client.encode(array), array)
        status = wait_idle(client)
        assert _processes(status) == pids, "a server process died or was restarted"
        return status


# -- strategies ----------------------------------------------------------------------------

FRESH = object()  # "use a fresh unique request id" (ids must be unique per client)

ints = st.one_of(st.integers(-3, 300), st.integers(-(2**63), 2**64 - 1))
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(), st.text(max_size=12), st.binary(max_size=12),
    st.builds(np.array, st.lists(st.integers(-5, 5), max_size=4)),  # the ndarray extension
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
)
values = st.one_of(
    st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
        max_leaves=10),
    st.builds(lambda n: _deep(n), st.sampled_from([50, 1000])),
)
dtypes = st.one_of(
    st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|b1", "<U3", "|S2", "<M8[s]", "<c8", ">i2",
                     "O", "|O", "V4", "S0", "U0", "<i4,<f4", "(2,)<i4", "M8[zz]", ""]),
    st.text(max_size=20), values)
shapes = st.one_of(
    st.lists(st.integers(0, 4), max_size=3),
    st.lists(st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**64 - 1)), max_size=4),
    st.lists(st.integers(0, 1), min_size=60, max_size=80),
    values)
metas = st.one_of(st.just(0), st.just(0), st.just(1),
                  st.sampled_from([2, -1, True, False, 0.0, None, "0"]),
                  st.builds(lambda d, s: [d, s], dtypes, shapes),
                  values)
KINDS = [P.REQUEST] * 8 + [P.COMMAND] * 3 + [P.HELLO, P.RESULT, P.ERROR, P.REPLY, P.REPLIES,
                                             P.BATCH, P.READY, P.DONE, P.FORWARD, P.EVENT,
                                             P.CONTROL, 0, 99, -1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


GOOD_DTYPES = ["<f4", "<f8", "|u1", "<i8", "|b1", "<U3", "|S2", "<M8[s]", "<c8", ">i2"]
plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=12), st.binary(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)
valid_metas = st.lists(
    st.one_of(st.just(0), st.just(0),
              st.builds(lambda d, s: [d, s], st.sampled_from(GOOD_DTYPES),
                        st.lists(st.integers(0, 4), max_size=3))),
    min_size=1, max_size=6)


def _item_frame(draw: Any, meta: Any) -> bytes:
    """A payload frame for ``meta``: the right size for a raw array (random bytes), a
    msgpack value for meta 0, else random bytes."""
    if (isinstance(meta, list) and len(meta) == 2 and isinstance(meta[1], list)
            and all(_is_int(n) for n in meta[1])):  # a shape: math.prod of lists is a list
        try:
            size = np.dtype(meta[0]).itemsize * math.prod(meta[1])
        except Exception:
            size = -1
        if 0 <= size <= 4096:
            return draw(st.binary(min_size=size, max_size=size))
    elif _is_int(meta) and meta == P.MSGPACK_ITEM:
        return P.pack(draw(plain))
    elif _is_int(meta) and meta == P.PICKLE_ITEM:
        return b"\x80\x04K\x01."  # a pickled 1: refused, the server has no -allow_pickle
    return draw(st.binary(max_size=64))


#: Values worth trying at each header position (after [version, kind]) besides any value.
SPECIAL = {
    0: st.sampled_from([0, V + 1, -1, str(V), float(V), True, None]),
    1: st.sampled_from(KINDS),
    2: st.one_of(ints, st.sampled_from([True, "1", 1.5, None])),
    3: st.one_of(st.integers(0, 60_000),
                 st.sampled_from([-1, math.nan, math.inf, -math.inf, 1e12, 0.001, True, "5"])),
    4: st.one_of(st.lists(metas, max_size=6), valid_metas),
}


@st.composite
def near_valid(draw: Any) -> tuple[list[Any], list[bytes]]:
    """A valid REQUEST or COMMAND (header in unpacked form, and its payload frames) with
    0 to 3 random mutations: a field replaced, one item meta or frame replaced, a frame
    or a field dropped or added."""
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(["status", "ping", "terminate"]))
        header: list[Any] = [V, P.COMMAND, FRESH, 0, name, None]
        frames: list[bytes] = []
    else:
        item_metas = draw(valid_metas)
        header = [V, P.REQUEST, FRESH, draw(st.sampled_from([0, 0, 0, 60_000, 1])),
                  item_metas]
        frames = [_item_frame(draw, m) for m in item_metas]
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.integers(0, 7))
        if mutation == 0:  # a header field: a value of interest for its position
            pos = draw(st.integers(0, len(header) - 1))
            header[pos] = draw(SPECIAL.get(pos, values))
        elif mutation == 1:  # a header field: anything
            header[draw(st.integers(0, len(header) - 1))] = draw(values)
        elif mutation == 2 and len(header) > 4 and isinstance(header[4], list) and header[4]:
            header[4] = list(header[4])
            index = draw(st.integers(0, len(header[4]) - 1))
            header[4][index] = draw(metas)
            if index < len(frames) and draw(st.booleans()):
                frames[index] = _item_frame(draw, header[4][index])
        elif mutation == 3 and frames:
            frames[draw(st.integers(0, len(frames) - 1))] = draw(st.binary(max_size=64))
        elif mutation == 4 and frames:
            frames.pop(draw(st.integers(0, len(frames) - 1)))
        elif mutation == 5:
            frames.insert(draw(st.integers(0, len(frames))), draw(st.binary(max_size=16)))
        elif mutation == 6 and len(header) > 1:
            header.pop()
        else:
            header.append(draw(values))
    return header, frames


random_frames = st.lists(st.binary(max_size=200), min_size=0, max_size=6)
senders = st.integers(0, len(_identities()) - 1)


def _header_bytes(header: list[Any], tally: Tally) -> bytes | None:
    header = [tally.fresh_id() if f is FRESH else f for f in header]
    try:
        return P.pack(header)
    except (ValueError, TypeError, OverflowError):  # nesting beyond msgpack's limit
        return None


# -- tests ---------------------------------------------------------------------------------


def test_fuzz_port_with_random_frames(server, pool, pids):
    """Random frame counts (0..6; zero frames cannot be sent, so an empty frame stands in)
    of random bytes on ``port``: one BadInput each, and the server serves on."""
    tally = Tally(pool, pids)

    @settings(FUZZ_SETTINGS, max_examples=800)
    @given(frames=random_frames, sender=senders)
    def run(frames: list[bytes], sender: int) -> None:
        tally.send(pool[sender].to_vent, frames or [b""])
        tally.drain()
        tally.check_alive()

    run()
    tally.settle()
    assert tally.replies["error"] >= tally.sent - 5  # random bytes are almost never valid
    assert tally.error_codes["bad_input"] >= tally.sent - 5
    assert tally.unparsed_errors >= tally.sent - 5
    assert_still_serves(server, pids)


def test_fuzz_port_with_near_valid_messages(server, pool, pids):
    """Valid-looking headers with random field values on ``port``: each gets exactly one
    reply (most are errors, some valid requests and commands are served)."""
    tally = Tally(pool, pids)
    skipped = Counter[str]()

    @settings(FUZZ_SETTINGS, max_examples=2000)
    @given(message=near_valid(), sender=senders)
    def run(message: tuple[list[Any], list[bytes]], sender: int) -> None:
        header, frames = message
        packed = _header_bytes(header, tally)
        if packed is None:
            skipped["unpackable"] += 1
            return
        tally.send(pool[sender].to_vent, [packed, *frames])
        tally.drain()
        tally.check_alive()

    run()
    tally.settle()
    assert tally.sent > 1500, f"only {tally.sent} messages were sent ({dict(skipped)})"
    assert tally.replies["error"] > 0
    assert tally.replies["result"] > 0, "no fuzzed request was valid: the generator is off"
    assert tally.error_codes["bad_input"] > 0
    assert 0 < tally.unparsed_errors < tally.replies["error"]  # some ids were readable
    status = assert_still_serves(server, pids)
    assert status["num_rejected"] > 0


def test_fuzz_port_out(server, pool, pids):
    """Random and near-valid messages on ``port_out``: a HELLO gets the handshake, anything
    else one BadInput with id -1."""
    tally = Tally(pool, pids)
    hello_ish = st.builds(
        lambda version, kind, fields: [version, kind, *fields],
        st.one_of(st.just(V), st.just(V), values),
        st.one_of(st.just(P.HELLO), st.just(P.HELLO), st.sampled_from(KINDS), values),
        st.one_of(st.lists(st.one_of(ints, values), min_size=1, max_size=1),
                  st.lists(values, max_size=3)))
    messages = st.one_of(
        random_frames.map(lambda frames: frames or [b""]),
        st.builds(lambda h, extra: [P.pack(h), *extra], hello_ish,
                  st.one_of(st.just([]), st.just([]), st.lists(st.binary(max_size=8),
                                                                max_size=3))))

    @settings(FUZZ_SETTINGS, max_examples=500)
    @given(frames=messages, sender=senders)
    def run(frames: list[bytes], sender: int) -> None:
        tally.send(pool[sender].from_sink, frames)
        tally.drain()
        tally.check_alive()

    run()
    tally.settle()
    assert tally.replies["error"] > 0 and tally.replies["reply"] > 0
    assert set(tally.error_codes) == {BadInput.code}
    assert tally.unparsed_errors == tally.replies["error"]
    assert_still_serves(server, pids)
