"""Helpers for processing units: :class:`RedisHandler`, a small Redis queue, and the
value codec shared by the Redis-backed classes (:mod:`.jobqueue`, :mod:`.queueworker`).

Values are msgpack with ndarrays carried as raw buffers (the wire protocol's extension
type, :data:`.protocol.EXT_NDARRAY`): str, bytes, numbers, lists, dicts, numpy arrays and
any nesting of them. Pickle is never used. Decoded arrays are read-only views over the
bytes read from Redis (``np.array(a)`` makes a writable copy).

redis-py is imported only when a handler is created, so ``import wkr_serving.client``
works without it (``pip install wkr-serving[redis]``).
"""

from __future__ import annotations

from typing import Any

from . import protocol as P
from .errors import ClientUsageError, ProtocolError

__all__ = ["RedisHandler", "dumps", "loads"]


def dumps(value: Any) -> bytes:
    """Encode ``value`` (msgpack; ndarrays as raw buffers); raise
    :class:`ClientUsageError` for a value msgpack cannot carry."""
    try:
        return P.pack(value)
    except (TypeError, ValueError, OverflowError, ProtocolError) as exc:
        raise ClientUsageError(
            f"cannot encode a value of type {type(value).__name__} (msgpack-able values "
            f"and ndarrays of plain dtypes only): {exc}") from None


def loads(buf: Any) -> Any:
    """Decode what :func:`dumps` made; raise :class:`ProtocolError` on bad bytes."""
    return P.decode_item(P.MSGPACK_ITEM, buf)


def import_redis() -> Any:
    """The redis module, with a clear message when it is missing."""
    try:
        import redis
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("this needs redis-py: pip install 'wkr-serving[redis]' "
                          "(or pip install 'redis>=5.0')") from None
    return redis


class RedisHandler:
    """A first-in first-out queue of values in one Redis list, plus plain get/set.

    ``RedisHandler(queue_key, ip, port, db=0, password=None)``; :meth:`push` appends,
    :meth:`pop` takes the oldest value or returns None at once when the queue is empty.
    Extra keyword arguments go to the ``redis.ConnectionPool`` (``socket_timeout``...).

    A value popped is gone from Redis: a unit that dies after :meth:`pop` loses it. For
    at-least-once processing use :class:`~wkr_serving.client.JobQueue` and
    :class:`~wkr_serving.client.QueueWorker`.
    """

    def __init__(self, queue_key: str, ip: str = "localhost", port: int = 6379, db: int = 0,
                 password: str | None = None, **pool_options: Any) -> None:
        redis = import_redis()
        if not isinstance(queue_key, str) or not queue_key:
            raise ClientUsageError("queue_key must be a non-empty string")
        self.queue_key = queue_key
        pool_options.setdefault("socket_connect_timeout", 10.0)
        pool_options.setdefault("socket_timeout", 30.0)
        self.pool = redis.ConnectionPool(host=ip, port=int(port), db=int(db),
                                         password=password, **pool_options)
        self.client = redis.Redis(connection_pool=self.pool)
        self._closed = False

    def push(self, value: Any) -> int:
        """Append ``value`` to the queue; return the queue's length after the push."""
        return int(self.client.rpush(self.queue_key, dumps(value)))

    def pop(self) -> Any:
        """Remove and return the oldest value, or None when the queue is empty."""
        raw = self.client.lpop(self.queue_key)
        return None if raw is None else loads(raw)

    def __len__(self) -> int:
        return int(self.client.llen(self.queue_key))

    def set(self, key: str, value: Any, ex: float | None = None) -> bool:
        """Store ``value`` under ``key`` (expiring after ``ex`` seconds when given)."""
        px = None if ex is None else max(1, int(ex * 1000))
        return bool(self.client.set(key, dumps(value), px=px))

    def get(self, key: str) -> Any:
        """The value stored under ``key``, or None."""
        raw = self.client.get(key)
        return None if raw is None else loads(raw)

    def close(self) -> None:
        """Close every connection of the handler's pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        self.pool.disconnect()

    def __enter__(self) -> RedisHandler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
