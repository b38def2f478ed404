"""Signaling without sockets: the HMAC scheme, replay protection, body validation, and
loading the mesh key. (Signaling over real HTTP and WebRTC is in test_links.py.)"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from daemon.net.meshkey import MESH_KEY_ENV, MeshKeyError, load_mesh_key
from daemon.net.signaling import (
    FRESHNESS_S,
    Authenticator,
    ReplayGuard,
    SignalAnswer,
    SignalingRefused,
    answer_from_json,
    answer_to_json,
    dtls_fingerprints,
    error_node_id,
    error_to_json,
    offer_from_json,
    offer_to_json,
)
from meshllm.wire import Hello

KEY = b"0123456789abcdef0123456789abcdef"
NOW_S = 1_700_000_000.0

SDP_A = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host\r\n"
    "a=fingerprint:sha-256 AA:BB:CC\r\n"
    "a=fingerprint:sha-512 dd:ee:ff\r\n"
)
SDP_B = SDP_A.replace("AA:BB:CC", "11:22:33")


def hello(index: int) -> Hello:
    return Hello(node_id=f"n-{index:016x}", name=f"node{index}", protocol_version=1,
                 mesh_name="default", model_id="m", api_port=8470,
                 mem_budget_bytes=1 << 30, ms_per_layer=2.0, can_coordinate=True)


def test_fingerprints_are_normalised_and_all_kept() -> None:
    assert dtls_fingerprints(SDP_A) == ("sha-256 AA:BB:CC", "sha-512 DD:EE:FF")
    with pytest.raises(SignalingRefused) as refused:
        dtls_fingerprints("v=0\r\n")
    assert refused.value.status == 400


B = hello(2).node_id
"""The node the offers of these tests are for."""


def test_an_offer_signed_with_the_key_verifies_once() -> None:
    sender = Authenticator(KEY)
    receiver = Authenticator(KEY)
    offer = sender.sign_offer(hello(1), SDP_A, NOW_S, to=B)

    receiver.verify_offer(offer_from_json(offer_to_json(offer)), NOW_S + 1, B)

    with pytest.raises(SignalingRefused, match="replayed") as refused:
        receiver.verify_offer(offer, NOW_S + 2, B)
    assert refused.value.status == 403


@pytest.mark.parametrize("key", [KEY, None])
def test_an_offer_for_one_node_is_refused_by_every_other(key: bytes | None) -> None:
    """A recorded offer replayed to another node (finding 5): refused before anything else,
    and its nonce stays unused at the node it was for."""
    offer = Authenticator(key).sign_offer(hello(1), SDP_A, NOW_S, to=B)
    node_c = hello(3).node_id
    at_c = Authenticator(key)
    with pytest.raises(SignalingRefused, match=f"the offer is for {B}; this is {node_c}") as refused:
        at_c.verify_offer(offer, NOW_S, node_c)
    assert refused.value.status == 421
    Authenticator(key).verify_offer(offer, NOW_S, B)


def test_an_offer_that_names_no_node_is_refused_with_the_nodes_id() -> None:
    offer = Authenticator(KEY).sign_offer(hello(1), SDP_A, NOW_S)
    with pytest.raises(SignalingRefused, match=f"names no node; this is {B}") as refused:
        Authenticator(KEY).verify_offer(offer, NOW_S, B)
    assert refused.value.status == 421
    body = error_to_json(refused.value, B)
    assert error_node_id(body) == B and error_node_id({"node_id": "x" * 65}) is None


def test_readdressing_an_offer_breaks_its_mac() -> None:
    offer = Authenticator(KEY).sign_offer(hello(1), SDP_A, NOW_S, to=B)
    node_c = hello(3).node_id
    with pytest.raises(SignalingRefused, match="wrong mesh key") as refused:
        Authenticator(KEY).verify_offer(dataclasses.replace(offer, to=node_c), NOW_S, node_c)
    assert refused.value.status == 403


@pytest.mark.parametrize(
    "tamper",
    [
        lambda offer: dataclasses.replace(offer, sdp=SDP_B),  # swapped certificate
        lambda offer: dataclasses.replace(offer, hello=dataclasses.replace(offer.hello, node_id="n-evil")),
        lambda offer: dataclasses.replace(offer, hello=dataclasses.replace(offer.hello, mem_budget_bytes=1)),
        lambda offer: dataclasses.replace(
            offer, auth=dataclasses.replace(offer.auth, timestamp_ms=offer.auth.timestamp_ms + 1)),
        lambda offer: dataclasses.replace(
            offer, auth=dataclasses.replace(offer.auth, nonce=bytes(16))),
    ],
)
def test_changing_anything_the_mac_covers_is_refused(tamper) -> None:
    offer = Authenticator(KEY).sign_offer(hello(1), SDP_A, NOW_S, to=B)
    with pytest.raises(SignalingRefused, match="wrong mesh key") as refused:
        Authenticator(KEY).verify_offer(tamper(offer), NOW_S, B)
    assert refused.value.status == 403


def test_a_refused_offer_does_not_use_up_its_nonce() -> None:
    receiver = Authenticator(KEY)
    offer = Authenticator(KEY).sign_offer(hello(1), SDP_A, NOW_S, to=B)
    with pytest.raises(SignalingRefused):
        receiver.verify_offer(dataclasses.replace(offer, sdp=SDP_B), NOW_S, B)
    receiver.verify_offer(offer, NOW_S, B)


def test_wrong_missing_and_unexpected_keys_are_refused() -> None:
    offer = Authenticator(b"another key of sixteen+ bytes").sign_offer(hello(1), SDP_A, NOW_S, to=B)
    with pytest.raises(SignalingRefused, match="wrong mesh key"):
        Authenticator(KEY).verify_offer(offer, NOW_S, B)
    keyless = Authenticator(None).sign_offer(hello(1), SDP_A, NOW_S, to=B)
    with pytest.raises(SignalingRefused, match="missing mesh key"):
        Authenticator(KEY).verify_offer(keyless, NOW_S, B)
    with pytest.raises(SignalingRefused, match="this node has no mesh key"):
        Authenticator(None).verify_offer(offer, NOW_S, B)
    Authenticator(None).verify_offer(keyless, NOW_S, B)


@pytest.mark.parametrize("skew_s", [-(FRESHNESS_S + 1), FRESHNESS_S + 1])
def test_old_or_future_timestamps_are_refused(skew_s: float) -> None:
    offer = Authenticator(KEY).sign_offer(hello(1), SDP_A, NOW_S + skew_s, to=B)
    with pytest.raises(SignalingRefused, match="stale"):
        Authenticator(KEY).verify_offer(offer, NOW_S, B)


def test_the_answer_is_bound_to_the_offer_and_the_responders_certificate() -> None:
    initiator = Authenticator(KEY)
    responder = Authenticator(KEY)
    offer = initiator.sign_offer(hello(1), SDP_A, NOW_S, to=B)
    responder.verify_offer(offer, NOW_S, B)
    answer = responder.sign_answer(offer, hello(2), SDP_B)

    initiator.verify_answer(answer_from_json(answer_to_json(answer)), offer)

    other_offer = initiator.sign_offer(hello(1), SDP_A, NOW_S, to=B)
    for forged, against in [
        (dataclasses.replace(answer, sdp=SDP_A), offer),        # certificate swapped
        (answer, other_offer),                                  # answer to another offer
        (Authenticator(b"not the mesh key at all!!").sign_answer(offer, hello(2), SDP_B), offer),
    ]:
        with pytest.raises(SignalingRefused, match="answer's HMAC does not match"):
            initiator.verify_answer(forged, against)
    with pytest.raises(SignalingRefused, match="no mesh key"):
        initiator.verify_answer(SignalAnswer(hello(2), SDP_B, None), offer)


def test_replay_guard_forgets_nonces_only_after_they_went_stale() -> None:
    guard = ReplayGuard(window_s=60.0, capacity=2)
    guard.remember(b"a" * 16, now_s=0.0)
    guard.remember(b"b" * 16, now_s=1.0)
    with pytest.raises(SignalingRefused) as flood:
        guard.remember(b"c" * 16, now_s=2.0)
    assert flood.value.status == 429
    with pytest.raises(SignalingRefused, match="replayed"):
        guard.check_fresh(b"a" * 16, timestamp_ms=100_000, now_s=100.0)
    guard.check_fresh(b"a" * 16, timestamp_ms=130_000, now_s=130.0)  # forgotten: stale by now
    guard.remember(b"c" * 16, now_s=130.0)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("not an object", "body must be a JSON object"),
        ({"hello": {}, "sdp": SDP_A, "auth": None, "more": 1}, "unknown field 'more'"),
        ({"sdp": SDP_A, "auth": None}, "missing field 'to'"),
        ({"sdp": SDP_A, "auth": None, "to": None}, "hello must be a JSON object"),
        ({"hello": "x", "sdp": SDP_A, "to": None}, "hello must be a JSON object"),
        ({"sdp": SDP_A, "hello": {"node_id": "n-1"}, "to": None}, "missing field 'name'"),
        ({"sdp": SDP_A, "hello": {}, "to": 7}, "to must be a node id"),
        ({"sdp": SDP_A, "hello": {}, "to": ""}, "to must be a node id"),
        ("hello.api_port", "api_port"),
        ("hello.ms_per_layer", "ms_per_layer"),
        ("sdp.long", "at most"),
        ("sdp.nofingerprint", "no DTLS fingerprint"),
        ("auth.nonce", "auth.nonce"),
        ("auth.timestamp", "timestamp_ms"),
        ("auth.mac", "auth.mac"),
    ],
)
def test_malformed_offers_are_refused_with_the_field_named(body: object, fragment: str) -> None:
    good = offer_to_json(Authenticator(KEY).sign_offer(hello(1), SDP_A, NOW_S, to=B))
    if body == "hello.api_port":
        good["hello"]["api_port"] = 70000
        body = good
    elif body == "hello.ms_per_layer":
        good["hello"]["ms_per_layer"] = "fast"
        body = good
    elif body == "sdp.long":
        good["sdp"] = SDP_A + "a=x\r\n" * 10000
        body = good
    elif body == "sdp.nofingerprint":
        good["sdp"] = "v=0\r\n"
        body = good
    elif body == "auth.nonce":
        good["auth"]["nonce"] = "zz" * 16
        body = good
    elif body == "auth.timestamp":
        good["auth"]["timestamp_ms"] = -5
        body = good
    elif body == "auth.mac":
        good["auth"]["mac"] = "ab"
        body = good
    with pytest.raises(SignalingRefused, match=fragment) as refused:
        offer_from_json(body)
    assert refused.value.status == 400


# --- the mesh key ---------------------------------------------------------------------------


def test_key_comes_from_the_file_then_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_text("  file-key-0123456789abcdef\n")
    key_file.chmod(0o600)
    env = {MESH_KEY_ENV: "env-key-0123456789abcdef"}

    assert load_mesh_key(key_file, env) == b"file-key-0123456789abcdef"
    assert load_mesh_key(None, env) == b"env-key-0123456789abcdef"
    assert load_mesh_key(None, {}) is None
    assert load_mesh_key(None, {MESH_KEY_ENV: "  "}) is None


def test_unusable_key_files_give_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    short = tmp_path / "short.key"
    short.write_text("abc")

    with pytest.raises(MeshKeyError, match=f"cannot read mesh key file {tmp_path / 'missing.key'}"):
        load_mesh_key(tmp_path / "missing.key", {})
    with pytest.raises(MeshKeyError, match="is empty"):
        load_mesh_key(empty, {})
    with pytest.raises(MeshKeyError, match="at least 16"):
        load_mesh_key(short, {})
    with pytest.raises(MeshKeyError, match="not a regular file"):
        load_mesh_key(tmp_path, {})
    with pytest.raises(MeshKeyError, match=MESH_KEY_ENV):
        load_mesh_key(None, {MESH_KEY_ENV: "short"})


def test_a_key_file_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_text("0123456789abcdef0123")
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="daemon.net.meshkey"):
        load_mesh_key(key_file, {})
    assert any("readable by other users" in r.getMessage() for r in caplog.records)
