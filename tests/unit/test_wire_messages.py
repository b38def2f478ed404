"""Messages and the codec: every type round-trips; bad values and bad bytes raise WireError."""

import math
import subprocess
import sys

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import WireError
from meshllm.wire import (
    MESSAGE_TAGS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Bye,
    DropSession,
    Forward,
    Heartbeat,
    Hello,
    LinkFigures,
    LinkReport,
    NodeReport,
    Plan,
    Stage,
    TuneAccepted,
    TuneDone,
    TuneJoin,
    TuneQuit,
    TuneRefused,
    TuneRound,
    TuneTensors,
    decode,
    encode,
    encode_tensor,
)
from tests.fixtures.wire_strategies import MESSAGE_STRATEGIES


def _frame(*items: object) -> bytes:
    """A frame built by hand: version byte then the CBOR array of ``items``."""
    return bytes([PROTOCOL_VERSION]) + cbor2.dumps(list(items))


def _hello() -> Hello:
    return Hello("n-1", "laptop", 1, "default", "abc", 8470, 2**33, 1.5, True)


def test_tags_are_unique_and_every_message_has_a_strategy() -> None:
    assert len(set(MESSAGE_TAGS.values())) == len(MESSAGE_TAGS)
    assert {MESSAGE_TAGS[cls]: cls for cls in MESSAGE_TAGS} == MESSAGE_TYPES
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TAGS)


@pytest.mark.parametrize("cls", list(MESSAGE_STRATEGIES), ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(MESSAGE_STRATEGIES[cls])
    frame = encode(msg)
    assert frame[0] == PROTOCOL_VERSION
    decoded = decode(frame)
    assert type(decoded) is cls
    assert decoded == msg
    assert encode(decoded) == frame


def test_messages_are_frozen_and_hashable() -> None:
    hello = _hello()
    with pytest.raises(AttributeError):
        hello.name = "other"  # type: ignore[misc]
    assert hash(hello) == hash(_hello())


def test_lists_become_tuples_and_ints_become_floats_when_building() -> None:
    plan = Plan(term=1, epoch=0, stages=[Stage("a", 0, 3)], codec="f32")  # type: ignore[arg-type]
    assert plan.stages == (Stage("a", 0, 3),)
    beat = Heartbeat("n-1", 2, 5)  # type: ignore[arg-type]
    assert beat.sent_at_s == 5.0 and type(beat.sent_at_s) is float
    assert decode(encode(beat)) == beat


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: Stage("a", 5, 3), "start 5 > end 3"),
        (lambda: NodeReport("a", 1, 10, 1.0, 4, 2, "ready"), "start 4 > end 2"),
        (lambda: Plan(1, 0, (Stage("a", 0, 3), Stage("b", 4, 9)), "f32"), "not contiguous"),
        (lambda: Plan(1, 0, (), "f32"), "Plan.stages"),
        (lambda: Plan(1, 0, (Stage("a", 0, 3),), "f64"), "Plan.codec"),
        (lambda: Stage("", 0, 3), "Stage.node_id"),
        (lambda: Stage("a" * 65, 0, 3), "Stage.node_id"),
        (lambda: Stage("a", -1, 3), "Stage.start_layer"),
        (lambda: Stage("a", 0, 65537), "Stage.end_layer"),
        (lambda: Stage("a", True, 3), "expected an integer, got bool"),
        (lambda: Stage("a", 0.0, 3), "expected an integer, got float"),
        (lambda: Bye("n-1", "line\nbreak"), "control"),
        (lambda: Bye("n-1", "x" * 1025), "Bye.reason"),
        (lambda: Heartbeat("n-1", 1, math.nan), "not finite"),
        (lambda: Heartbeat("n-1", 1, -1.0), "out of range"),
        (lambda: Heartbeat("n-1", 2**63, 1.0), "Heartbeat.term"),
        (lambda: Hello("n", "x", 1, "m", "id", 0, 1, 1.0, True), "Hello.api_port"),
        (lambda: Hello("n", "x", 1, "m", "id", 80, 1, 1.0, 1), "expected a bool"),
        (lambda: Forward("s", 0, 0, 0, 0, b"raw", ()), "expected TensorPayload"),
        (lambda: DropSession(7), "expected a string"),
    ],
)
def test_invalid_values_are_refused_when_building(build, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=words):
        build()


def test_forward_route_is_bounded() -> None:
    payload = encode_tensor(np.zeros((1, 4), np.float32), "f32")
    Forward("s", 0, 0, 0, 0, payload, ("n",) * 256)
    with pytest.raises(WireError, match="Forward.route"):
        Forward("s", 0, 0, 0, 0, payload, ("n",) * 257)


def _link_report(links: tuple[LinkFigures, ...] = (), **changes: object) -> LinkReport:
    fields = dict(node_id="a", term=1, epoch=2, head_ms=3.0, prefill_ms_per_layer=0.0, ms_per_layer=0.5,
                  ms_per_token=12.0, tokens=40, entry=True, target_ms_per_token=0.0, target_ttft_ms=0.0, links=links)
    return LinkReport(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: _link_report((LinkFigures("b", 1.0, 2.0, 3.0),) * 2), "a peer is listed twice"),
        (lambda: _link_report((LinkFigures("a", 1.0, 2.0, 3.0),)), "link to itself"),
        (lambda: _link_report(tuple(LinkFigures(f"p{i}", 1.0, 1.0, 1.0) for i in range(65))),
         r"LinkReport.links: 65 items; allowed 0..64"),
        (lambda: LinkFigures("b", -1.0, 1.0, 1.0), "LinkFigures.rtt_ms: -1.0 is out of range"),
        (lambda: LinkFigures("b", 1.0, 100_001.0, 1.0), "LinkFigures.small_mb_s"),
        (lambda: LinkFigures("b", 1.0, 1.0, math.inf), "LinkFigures.large_mb_s: inf is not finite"),
        (lambda: LinkFigures("", 1.0, 1.0, 1.0), "LinkFigures.peer_id"),
        (lambda: _link_report(ms_per_token=4e6), "LinkReport.ms_per_token"),
        (lambda: _link_report(head_ms=-0.5), "LinkReport.head_ms"),
        (lambda: _link_report(entry=1), "LinkReport.entry: expected a bool"),
    ],
)
def test_link_reports_are_bounded(build, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=words):
        build()


def test_a_link_report_of_64_peers_round_trips() -> None:
    report = _link_report(tuple(LinkFigures(f"p{i}", 30.5, 12.0, 0.0) for i in range(64)))
    assert decode(encode(report)) == report
    with pytest.raises(WireError, match="LinkFigures: expected 4 fields"):
        decode(_frame(22, "a", 1, 2, 3.0, 0.0, 0.5, 12.0, 40, True, 0.0, 0.0, [["b", 1.0, 2.0]]))


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(WireError, match="not a message"):
        encode(Stage("a", 0, 1))  # a nested value, not a message
    with pytest.raises(WireError, match="not a message"):
        encode("hello")  # type: ignore[arg-type]


HELLO_FIELDS = ["n-1", "laptop", 1, "default", "abc", 8470, 2**33, 1.5, True]


@pytest.mark.parametrize(
    "frame, words",
    [
        (b"", "empty"),
        (bytes([PROTOCOL_VERSION + 1]) + cbor2.dumps([1, *HELLO_FIELDS]), f"protocol version {PROTOCOL_VERSION + 1} is not supported"),
        (bytes([0]) + cbor2.dumps([1, *HELLO_FIELDS]), "protocol version 0"),
        (_frame(99, "x"), "unknown message type tag 99"),
        (_frame("hello", "x"), "unknown message type tag 'hello'"),
        (_frame(), "non-empty CBOR array"),
        (bytes([PROTOCOL_VERSION]) + cbor2.dumps(5), "non-empty CBOR array"),
        (_frame(1, *HELLO_FIELDS[:-1]), "Hello: expected 9 fields, got 8"),
        (_frame(1, *HELLO_FIELDS, 0), "Hello: expected 9 fields, got 10"),
        (_frame(1, *HELLO_FIELDS[:5], "8470", *HELLO_FIELDS[6:]), "Hello.api_port: expected an integer"),
        (_frame(1, *HELLO_FIELDS[:7], 2, True), "Hello.ms_per_layer: expected a float"),
        (_frame(1, *HELLO_FIELDS[:8], 1), "Hello.can_coordinate: expected a bool"),
        (_frame(8, 1, 0, [["a", 0]], "f32"), "Stage: expected 3 fields"),
        (_frame(8, 1, 0, [["a", 5, 2]], "f32"), "start 5 > end 2"),
        (_frame(8, 1, 0, "stages", "f32"), "Plan.stages: expected an array"),
        (_frame(1, *HELLO_FIELDS) + b"\x00", "1 trailing bytes"),
        (bytes([PROTOCOL_VERSION]) + cbor2.dumps({"type": 1}), "maps are not allowed"),
        (bytes([PROTOCOL_VERSION, 0x81, 0xF9, 0x3C, 0x00]), "simple value or float encoding 0xf9"),
        (bytes([PROTOCOL_VERSION, 0x81, 0x18, 0x01]), "shortest form"),
        (bytes([PROTOCOL_VERSION, 0x9F, 0x01, 0xFF]), "indefinite"),
        (bytes([PROTOCOL_VERSION, 0x82, 0x0C, 0xD8, 0x23, 0x61, 0x61]), "tags are not allowed"),
        (bytes([PROTOCOL_VERSION, 0x82, 0x0C, 0x62, 0xFF, 0xFE]), "CBOR"),  # invalid UTF-8
        (bytes([PROTOCOL_VERSION, 0x82, 0x0C, 0x61]), "string declares 1 bytes but only 0"),
        (bytes([PROTOCOL_VERSION]) + b"\x81" * 20 + b"\x01", "nested deeper than 8"),
    ],
)
def test_bad_frames_raise_wire_error_naming_the_problem(frame: bytes, words: str) -> None:
    with pytest.raises(WireError, match=words):
        decode(frame)


def test_oversized_frames_are_refused_before_parsing() -> None:
    frame = encode(_hello())
    assert decode(frame, max_bytes=len(frame)) == _hello()
    with pytest.raises(WireError, match="over the limit"):
        decode(frame, max_bytes=len(frame) - 1)


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(WireError, match="decode takes bytes"):
        decode("\x01\x80")  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode(_hello())
    assert decode(bytearray(frame)) == _hello()
    assert decode(memoryview(frame)) == _hello()


def test_nested_tensor_payload_errors_are_wire_errors() -> None:
    payload = encode_tensor(np.ones((1, 4), np.float32), "f32", compress=False)
    good = Forward("s", 0, 1, 0, 0, payload, ())
    raw = cbor2.loads(encode(good)[1:])
    raw[6][3] = raw[6][3][:-1]  # drop one byte of tensor data
    with pytest.raises(WireError, match="TensorPayload.data: 15 bytes"):
        decode(_frame(*raw))
    raw[6] = ["f32", [1, 4], False]
    with pytest.raises(WireError, match="TensorPayload: expected 4 fields"):
        decode(_frame(*raw))


def test_wire_imports_neither_torch_nor_networking() -> None:
    code = (
        "import sys, meshllm.wire; "
        "print(sorted(m for m in ('torch', 'aiortc', 'zeroconf', 'textual', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- federated fine-tuning messages ----------------------------------------------------------


def _tune_tensors(**changes: object) -> TuneTensors:
    payload = encode_tensor(np.ones((2, 4), np.float32), "f32", compress=False)
    fields = dict(job_id="n-1/tune-1", round=1, kind="update", part=0, parts=2, examples=10, loss=1.5,
                  names=("x.lora_A.weight",), tensors=(payload,))
    return TuneTensors(**{**fields, **changes})  # type: ignore[arg-type]


def _tune_round(**changes: object) -> TuneRound:
    fields = dict(job_id="n-1/tune-1", round=1, rounds=3, rank=8, alpha=16.0, steps=10, aggregate="mean",
                  participants=("a", "b"), loss=0.0, parts=1)
    return TuneRound(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: TuneJoin(0, 8, 16.0, 10, "mean", 5), "TuneJoin.rounds"),
        (lambda: TuneJoin(3, 0, 16.0, 10, "mean", 5), "TuneJoin.rank"),
        (lambda: TuneJoin(3, 1025, 16.0, 10, "mean", 5), "TuneJoin.rank"),
        (lambda: TuneJoin(3, 8, 0.0, 10, "mean", 5), "TuneJoin.alpha: 0.0 must be above 0"),
        (lambda: TuneJoin(3, 8, math.nan, 10, "mean", 5), "not finite"),
        (lambda: TuneJoin(3, 8, 16.0, 0, "mean", 5), "TuneJoin.steps"),
        (lambda: TuneJoin(3, 8, 16.0, 10, "sum", 5), "TuneJoin.aggregate: 'sum' is not one of mean, median, trimmed"),
        (lambda: TuneJoin(3, 8, 16.0, 10, "mean", 0), "TuneJoin.examples"),
        (lambda: _tune_round(round=4), "TuneRound.round: 4 is past the job's 3 rounds"),
        (lambda: _tune_round(round=0), "TuneRound.round"),
        (lambda: _tune_round(participants=("a", "a")), "TuneRound.participants: an item is listed twice"),
        (lambda: _tune_round(participants=tuple(f"n{i}" for i in range(257))), "TuneRound.participants: 257 items"),
        (lambda: _tune_round(loss=-1.0), "TuneRound.loss"),
        (lambda: _tune_round(parts=0), "TuneRound.parts"),
        (lambda: _tune_tensors(part=2), "TuneTensors.part: 2 is not below parts 2"),
        (lambda: _tune_tensors(kind="delta"), "TuneTensors.kind"),
        (lambda: _tune_tensors(names=()), "TuneTensors.names: 0 items"),
        (lambda: _tune_tensors(names=("a", "b")), "2 names for 1 tensors"),
        (lambda: _tune_tensors(names=("n" * 161,)), "TuneTensors.names\\[0\\]: string of 161"),
        (lambda: _tune_tensors(names=("a\nb",)), "control"),
        (lambda: _tune_tensors(names=("a",) * 2, tensors=_tune_tensors().tensors * 2), "listed twice"),
        (lambda: _tune_tensors(names=tuple(f"t{i}" for i in range(65)), tensors=_tune_tensors().tensors * 65),
         "TuneTensors.names: 65 items"),
        (lambda: _tune_tensors(tensors=(encode_tensor(np.ones((2, 4), np.float32), "f16"),)),
         "has codec f16; only f32"),
        (lambda: _tune_tensors(names=("a", "b"), tensors=(encode_tensor(np.ones((1024, 1024), np.float32), "f32"),
                                                          encode_tensor(np.ones((1, 1), np.float32), "f32"))),
         "4194308 bytes of tensors in one part"),
        (lambda: _tune_tensors(tensors=(encode_tensor(np.ones((2**23 + 1,), np.float32), "f32"),)),
         "8388609 elements"),
        (lambda: _tune_tensors(loss=math.inf), "not finite"),
        (lambda: _tune_tensors(parts=4097), "TuneTensors.parts"),
        (lambda: TuneRefused("j", 0, "x" * 1025), "TuneRefused.reason"),
        (lambda: TuneQuit("j" * 65), "TuneQuit.job_id"),
        (lambda: TuneAccepted("", 1, 3, 8, 16.0, 10, "mean"), "TuneAccepted.job_id"),
        (lambda: TuneDone("j", 3, 8, 16.0, (), 1.0, "ab" * 31, 1), "TuneDone.digest: string of 62"),
        (lambda: TuneDone("j", 3, 8, 16.0, (), 1.0, "AB" * 32, 1), "TuneDone.digest: not lowercase hex"),
        (lambda: TuneDone("j", 3, 8, 16.0, ("a", "a"), 1.0, "ab" * 32, 1), "TuneDone.participants"),
    ],
)
def test_tune_messages_are_bounded(build, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=words):
        build()


def test_a_tune_part_of_64_tensors_or_one_large_tensor_round_trips() -> None:
    small = encode_tensor(np.full((8, 16), 0.25, np.float32), "f32")
    full = _tune_tensors(names=tuple(f"t{i}" for i in range(64)), tensors=(small,) * 64)
    assert decode(encode(full)) == full
    large = _tune_tensors(tensors=(encode_tensor(np.ones((2048, 1024), np.float32), "f32"),))  # 8 MiB alone
    assert decode(encode(large)) == large
    assert TuneQuit("") == decode(encode(TuneQuit("")))
    assert TuneRefused("", 0, "no job") == decode(encode(TuneRefused("", 0, "no job")))
