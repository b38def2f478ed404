"""The wire format of meshllm: pure (no I/O), torch-free, fuzzed.

Sending::

    payload = encode_tensor(hidden, "f16")                       # np.float32 array
    data = encode(Forward(session_id, seq, term, start_pos, payload, route))
    for piece in split_frames(data, message_id):                 # each <= MAX_FRAME_BYTES
        channel.send(piece)

Receiving (one :class:`Reassembler` per channel)::

    data = reassembler.feed(piece, now)                          # None until complete
    if data is not None:
        msg = decode(data)                                       # a message dataclass
        hidden = decode_tensor(msg.hidden, expect_shape=(None, 576))

Everything that goes wrong with bytes from the network raises
:class:`meshllm.errors.WireError`, and only that. The byte layout, the codecs with their
measured sizes, and the limits are in docs/wire-format.md.
"""

from meshllm.wire.codec import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode
from meshllm.wire.framing import MAX_FRAME_BYTES, Reassembler, split_frames
from meshllm.wire.messages import (
    MESSAGE_TAGS,
    MESSAGE_TYPES,
    Answer,
    Bye,
    CacheHandover,
    Coordinator,
    DropSession,
    Election,
    Error,
    Forward,
    Heartbeat,
    HandoverDone,
    HeartbeatAck,
    Hello,
    LinkFigures,
    LinkReport,
    Message,
    NodeReport,
    Plan,
    PlanActive,
    PlanRefused,
    Rebuild,
    Rebuilt,
    Result,
    Stage,
    StageReady,
    StepFailed,
    TuneAccepted,
    TuneDone,
    TuneJoin,
    TuneQuit,
    TuneRefused,
    TuneRound,
    TuneTensors,
)
from meshllm.wire.tensor import CODECS, TensorPayload, decode_tensor, encode_tensor

__all__ = [
    "CODECS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_FRAME_BYTES",
    "MESSAGE_TAGS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Answer",
    "Bye",
    "CacheHandover",
    "Coordinator",
    "DropSession",
    "Election",
    "Error",
    "Forward",
    "Heartbeat",
    "HandoverDone",
    "HeartbeatAck",
    "Hello",
    "LinkFigures",
    "LinkReport",
    "Message",
    "NodeReport",
    "Plan",
    "PlanActive",
    "PlanRefused",
    "Reassembler",
    "Rebuild",
    "Rebuilt",
    "Result",
    "Stage",
    "StageReady",
    "StepFailed",
    "TensorPayload",
    "TuneAccepted",
    "TuneDone",
    "TuneJoin",
    "TuneQuit",
    "TuneRefused",
    "TuneRound",
    "TuneTensors",
    "decode",
    "decode_tensor",
    "encode",
    "encode_tensor",
    "split_frames",
]
