"""RESP, the Redis wire protocol: commands built as bytes in bulk, replies parsed by hiredis.

Both hot paths skip redis-py's per-command Python work: the Arrow writer sends a
whole chunk's ``HSET`` commands as one prebuilt byte string, the serving reader a
whole request's ``HMGET`` commands. The pieces they build them from live here:

* :func:`bulk` is one bulk string, ``$<length>\\r\\n<bytes>\\r\\n``; :func:`bulk_rows`
  is the bulk string of every row of a :class:`~derm.feast_plugins.redis_format.RaggedBytes`;
* :func:`command_head` starts a command (``*<count>\\r\\n`` and the command's name);
* :func:`keyed_commands` is the same command around each of many keys (the reader's
  ``HMGET key fields...`` per entity, the writer's key list of one ``EVAL``).

:class:`RespConnection` sends such bytes over one pooled redis-py connection and reads
``n`` replies off its socket with hiredis (the only reply loop; it reads the socket
through :func:`derm.feast_plugins.compat.connection_socket`). Error replies do not stop
the loop: every reply is read, so the connection stays in step, and the first error
is returned for the caller to raise. hiredis is optional (``feast[redis]`` installs
it); without it :data:`HIREDIS` is False and callers use redis-py pipelines.

Example::

    payload = keyed_commands(command_head(b"HMGET", 3), keys, bulk(b"_ts:view") + bulk(field))
    connection = client.connection_pool.get_connection()
    channel = RespConnection(connection)
    channel.send(payload)
    replies, error = channel.read(len(keys))   # one [ts, value] list per key
    client.connection_pool.release(connection)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from derm.feast_plugins import compat
from derm.feast_plugins.redis_format import RaggedBytes, concat_rows, lookup

try:  # hiredis parses replies in C; without it callers fall back to redis-py pipelines.
    import hiredis
except ImportError:  # pragma: no cover - feast[redis] installs it
    hiredis = None

HIREDIS = hiredis is not None
"""Whether replies can be read with :class:`RespConnection`."""

_RECV_BYTES = 1 << 20


def bulk(value: bytes) -> bytes:
    """One RESP bulk string: ``$<length>\\r\\n<value>\\r\\n``."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command_head(name: bytes, arguments: int) -> bytes:
    """The start of a command followed by ``arguments`` bulk strings: ``*<arguments + 1>\\r\\n`` + bulk(name)."""
    return b"*%d\r\n" % (arguments + 1) + bulk(name)


def bulk_rows(strings: RaggedBytes) -> list[RaggedBytes]:
    """The RESP bulk string of every row, as three parts to :func:`concat_rows` (header, bytes, CRLF)."""
    rows = len(strings)
    distinct, codes = np.unique(strings.lengths, return_inverse=True)
    headers = lookup([b"$%d\r\n" % length for length in distinct.tolist()], codes)
    return [headers, strings, RaggedBytes.constant(b"\r\n", rows)]


def keyed_commands(head: bytes, keys: RaggedBytes, tail: bytes) -> bytes:
    """``head + bulk(key) + tail`` for every key, back to back, built with NumPy in one piece."""
    rows = len(keys)
    if rows == 0:
        return b""
    if keys.width is not None:
        # Every command is the same bytes around its key: fill one (rows, width) array.
        key_head = head + b"$%d\r\n" % keys.width
        key_tail = b"\r\n" + tail
        start, end = len(key_head), len(key_head) + keys.width
        commands = np.empty((rows, end + len(key_tail)), dtype=np.uint8)
        commands[:, :start] = np.frombuffer(key_head, np.uint8)
        commands[:, start:end] = keys.matrix()
        commands[:, end:] = np.frombuffer(key_tail, np.uint8)
        return commands.tobytes()
    parts = [*bulk_rows(keys)]
    if head:
        parts.insert(0, RaggedBytes.constant(head, rows))
    if tail:
        parts.append(RaggedBytes.constant(tail, rows))
    return concat_rows(parts).data.tobytes()


class RespConnection:
    """Prebuilt RESP over one connected redis-py connection, replies parsed by hiredis.

    The parser keeps whatever arrived past the last reply read, so replies can be read
    in parts: the writer reads a chunk's ``HSET`` replies only once the next chunk is sent.
    The caller owns the connection (takes it from and returns it to its pool) and must
    disconnect it when replies were left unread.
    """

    __slots__ = ("connection", "parser")

    def __init__(self, connection: Any):
        if hiredis is None:  # pragma: no cover - feast[redis] installs it
            raise RuntimeError("RespConnection needs hiredis; use redis-py pipelines without it")
        self.connection = connection
        self.parser = hiredis.Reader()

    def send(self, payload: bytes) -> None:
        """Send RESP bytes (any number of commands) as they are."""
        self.connection.send_packed_command([payload], check_health=False)

    def read(self, count: int) -> tuple[list[Any], ResponseError | None]:
        """The next ``count`` replies in order, and the first error reply among them (None when there is none).

        Error replies stay in the list (as ``hiredis.ReplyError``) so that every reply is consumed.

        Raises:
            redis.ConnectionError: the server closed the connection.
            OSError: the socket failed or timed out (``socket_timeout`` of the connection).
        """
        parser = self.parser
        received: list[Any] = []
        error: ResponseError | None = None
        if count <= 0:
            return received, error
        sock = compat.connection_socket(self.connection)
        if sock is None:
            raise RedisConnectionError("Connection is not connected.")
        while len(received) < count:
            reply = parser.gets()
            if reply is False:
                data = sock.recv(_RECV_BYTES)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                parser.feed(data)
                continue
            if error is None and isinstance(reply, hiredis.ReplyError):
                error = ResponseError(str(reply))
            received.append(reply)
        return received, error
