"""Framing: split an encoded message into data-channel-sized pieces and put it back together.

A WebRTC data channel carries at most 262,144 bytes per message, so every message travels as
one or more pieces of at most :data:`MAX_FRAME_BYTES`. Each piece is an 8-byte header then a
slice of the message::

    message_id: uint32 big-endian   the sender's counter, one per message on a channel
    index:      uint16 big-endian   0 .. count-1, sent in order
    count:      uint16 big-endian   number of pieces of this message (>= 1)
    payload:    the bytes of the slice

:class:`Reassembler` is sans-IO: feed it the pieces a channel delivers, with ``now``, and it
returns each message when its last piece arrives. Channels are reliable and ordered, so a
piece out of order, a duplicate, or a count that changes mid-message means a broken or
hostile peer: WireError, and the partial message is dropped. Pieces of different messages may
interleave (up to ``max_partial_messages`` at once).
"""

import math
import struct
from dataclasses import dataclass, field

from meshllm.errors import WireError
from meshllm.wire.codec import DEFAULT_MAX_MESSAGE_BYTES

MAX_FRAME_BYTES = 262144
"""Largest piece, header included: the data channel's largest message."""

FRAME_HEADER_BYTES = 8
_HEADER = struct.Struct(">IHH")
MAX_MESSAGE_ID = 2**32 - 1
MAX_PIECES = 2**16 - 1


def split_frames(
    data: bytes, message_id: int, *, max_frame_bytes: int = MAX_FRAME_BYTES
) -> list[bytes]:
    """The pieces of ``data``, each at most ``max_frame_bytes`` long, in sending order.

    ``message_id`` (0 .. 2**32-1) must differ from those of other messages still in flight on
    the same channel; a counter that wraps is fine.
    """
    if not 0 <= message_id <= MAX_MESSAGE_ID:
        raise WireError(f"message_id {message_id} is out of range [0, {MAX_MESSAGE_ID}]")
    capacity = max_frame_bytes - FRAME_HEADER_BYTES
    if capacity < 1:
        raise WireError(f"max_frame_bytes must be more than {FRAME_HEADER_BYTES}")
    count = max(1, math.ceil(len(data) / capacity))
    if count > MAX_PIECES:
        raise WireError(f"message of {len(data)} bytes needs {count} pieces; at most {MAX_PIECES}")
    view = memoryview(data)
    return [
        _HEADER.pack(message_id, index, count) + view[index * capacity : (index + 1) * capacity]
        for index in range(count)
    ]


@dataclass
class _Partial:
    count: int
    last_seen_s: float
    chunks: list[bytes] = field(default_factory=list)
    size_bytes: int = 0


class Reassembler:
    """Puts pieces from one channel back into messages, within bounds.

    - ``max_message_bytes``: largest message (default 64 MiB);
    - ``max_partial_messages``: most messages in progress at once;
    - ``max_buffered_bytes``: most bytes held across all messages in progress;
    - ``partial_timeout_s``: :meth:`expire` drops a message that got no piece for this long;
    - ``max_frame_bytes``: largest piece accepted.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_partial_messages: int = 8,
        max_buffered_bytes: int = 2 * DEFAULT_MAX_MESSAGE_BYTES,
        partial_timeout_s: float = 30.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        if max_frame_bytes <= FRAME_HEADER_BYTES:
            raise ValueError(f"max_frame_bytes must be more than {FRAME_HEADER_BYTES}")
        self.max_message_bytes = max_message_bytes
        self.max_partial_messages = max_partial_messages
        self.max_buffered_bytes = max_buffered_bytes
        self.partial_timeout_s = partial_timeout_s
        self.max_frame_bytes = max_frame_bytes
        capacity = max_frame_bytes - FRAME_HEADER_BYTES
        self._max_count = min(MAX_PIECES, max(1, math.ceil(max_message_bytes / capacity)))
        self._partials: dict[int, _Partial] = {}
        self._buffered_bytes = 0

    @property
    def pending_messages(self) -> int:
        """Messages with some but not all pieces received."""
        return len(self._partials)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for messages in progress."""
        return self._buffered_bytes

    def feed(self, piece: bytes, now: float) -> bytes | None:
        """Take one piece; return the whole message if this was its last piece, else None.

        Raises WireError for a malformed, oversized, duplicated, out-of-order or inconsistent
        piece, or when a bound would be exceeded; the message it belonged to is dropped.
        """
        if len(piece) > self.max_frame_bytes:
            raise WireError(f"piece of {len(piece)} bytes; at most {self.max_frame_bytes}")
        if len(piece) < FRAME_HEADER_BYTES:
            raise WireError(f"piece of {len(piece)} bytes is shorter than its header")
        message_id, index, count = _HEADER.unpack_from(piece)
        payload = bytes(memoryview(piece)[FRAME_HEADER_BYTES:])
        where = f"message {message_id} piece {index}/{count}"
        if count == 0 or index >= count:
            self._drop(message_id)
            raise WireError(f"{where}: index must be below a count of at least 1")
        if count > self._max_count:
            self._drop(message_id)
            raise WireError(
                f"{where}: {count} pieces could exceed the {self.max_message_bytes}-byte limit"
            )
        partial = self._partials.get(message_id)
        if partial is None:
            if index != 0:
                raise WireError(f"{where}: arrived before piece 0 (out of order or stale)")
            if count == 1:
                self._check_size(len(payload), where)
                return payload
            if len(self._partials) >= self.max_partial_messages:
                raise WireError(
                    f"{where}: more than {self.max_partial_messages} messages in progress"
                )
            partial = _Partial(count=count, last_seen_s=now)
            self._partials[message_id] = partial
        else:
            expected = len(partial.chunks)
            problem = None
            if count != partial.count:
                problem = f"count changed from {partial.count}"
            elif index < expected:
                problem = "duplicate piece"
            elif index > expected:
                problem = f"out of order: piece {expected} expected"
            if problem is not None:
                self._drop(message_id)
                raise WireError(f"{where}: {problem}")
        try:
            self._check_size(partial.size_bytes + len(payload), where)
            if self._buffered_bytes + len(payload) > self.max_buffered_bytes:
                raise WireError(
                    f"{where}: more than {self.max_buffered_bytes} bytes buffered in all"
                )
        except WireError:
            self._drop(message_id)
            raise
        partial.chunks.append(payload)
        partial.size_bytes += len(payload)
        partial.last_seen_s = now
        self._buffered_bytes += len(payload)
        if index < count - 1:
            return None
        self._drop(message_id)
        return b"".join(partial.chunks)

    def expire(self, now: float) -> list[int]:
        """Drop messages that got no piece for ``partial_timeout_s``; return their ids."""
        stale = [
            message_id
            for message_id, partial in self._partials.items()
            if now - partial.last_seen_s > self.partial_timeout_s
        ]
        for message_id in stale:
            self._drop(message_id)
        return stale

    def _check_size(self, size_bytes: int, where: str) -> None:
        if size_bytes > self.max_message_bytes:
            raise WireError(f"{where}: message over the limit of {self.max_message_bytes} bytes")

    def _drop(self, message_id: int) -> None:
        partial = self._partials.pop(message_id, None)
        if partial is not None:
            self._buffered_bytes -= partial.size_bytes
