"""The mesh key as a user meets it: made by the first start, carried by an invite code, named by
a key id that reveals nothing, and kept in files only its owner can read."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.invite import (
    INVITE_PREFIX, OPEN_KEY_ID, InviteError, invite_code, is_key_id, key_id, new_mesh_key, parse_invite,
)
from daemon.net.discovery import BadRecord, key_mismatch, parse_txt, txt_for
from daemon.net.meshkey import MESH_KEY_ENV, MESH_KEY_FILE, MeshKeyError, resolve_mesh_key
from daemon.node.config import ConfigError, NodeConfig
from daemon.node.identity import NODE_ID_FILE, load_or_create_node_id
from daemon.private_files import make_private_dir, write_private
from meshllm.wire import PROTOCOL_VERSION, Hello
from tui.mesh_status import MeshStatus
from tui.status_table import format_status
from tui.views.mesh import format_facts

KEY = b"a-mesh-key-of-24-bytes!!"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0: a file is private only if the code makes it so."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHLLM_"):
            monkeypatch.delenv(name)


# -- invite codes ---------------------------------------------------------------------------------


def test_an_invite_code_carries_the_key_in_one_short_word() -> None:
    key = new_mesh_key()
    code = invite_code(key)
    assert parse_invite(code) == key
    assert code.startswith(INVITE_PREFIX) and code.isalnum() and len(code) <= 60
    assert code.lower() == code and len(code.split()) == 1


def test_a_code_typed_by_hand_may_differ_in_case_spaces_and_dashes() -> None:
    code = invite_code(KEY)
    grouped = "-".join(code[i:i + 5] for i in range(0, len(code), 5))
    assert parse_invite(f"  {code.upper()}\n") == KEY
    assert parse_invite(grouped) == KEY
    assert parse_invite(" ".join(grouped.split("-"))) == KEY


def test_a_mistyped_code_never_gives_another_key() -> None:
    code = invite_code(KEY)
    refused = 0
    for i in range(len(INVITE_PREFIX), len(code)):
        for c in "abcdefghijklmnopqrstuvwxyz234567":
            if c == code[i]:
                continue
            try:
                assert parse_invite(code[:i] + c + code[i + 1:]) == KEY  # only unused padding bits changed
            except InviteError as error:
                assert "\n" not in str(error)
                refused += 1
    assert refused > 0.9 * 31 * (len(code) - len(INVITE_PREFIX))
    with pytest.raises(InviteError, match="checksum does not match"):
        parse_invite(code[:12] + ("a" if code[12] != "a" else "b") + code[13:])
    with pytest.raises(InviteError, match="mistyped|cut short"):
        parse_invite(code[:-1])
    with pytest.raises(InviteError, match="cut short"):
        parse_invite(code[:20])


@pytest.mark.parametrize(("code", "words"), [
    ("", "empty"),
    ("hello", "not an invite code"),
    ("meshllm2abcdefgh", "version 2"),
    (INVITE_PREFIX + "abc0efgh", "'0' never appears"),
    (INVITE_PREFIX + "a" * 100_000, "too long"),
])
def test_what_is_not_a_code_is_refused_with_one_line(code: str, words: str) -> None:
    with pytest.raises(InviteError, match=words) as refused:
        parse_invite(code)
    assert "\n" not in str(refused.value)


def test_a_key_id_names_a_key_and_reveals_nothing_of_it() -> None:
    ident = key_id(KEY)
    assert is_key_id(ident) and len(ident) == 16 and ident == key_id(KEY)
    assert key_id(KEY + b"x") != ident
    assert ident not in KEY.hex() and ident.encode() not in KEY
    assert key_id(None) == OPEN_KEY_ID and is_key_id(OPEN_KEY_ID)
    assert not is_key_id("ABCDEF0123456789") and not is_key_id("abc")


# -- where the key comes from ---------------------------------------------------------------------


def test_the_first_start_makes_a_private_key_and_later_starts_reuse_it(tmp_path: Path, no_umask: None) -> None:
    state = tmp_path / "new" / "state"
    key = resolve_mesh_key(None, {}, state)
    assert key is not None and len(key) >= 16
    assert mode(state) == 0o700 and mode(state / MESH_KEY_FILE) == 0o600
    assert resolve_mesh_key(None, {}, state) == key
    other = resolve_mesh_key(None, {}, tmp_path / "other")
    assert other != key  # two devices started alone have two meshes


def test_the_key_file_wins_then_the_environment_then_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    stored = resolve_mesh_key(None, {}, state)
    key_file = tmp_path / "given.key"
    key_file.write_bytes(b"file-key-0123456789abcdef\n")
    key_file.chmod(0o600)
    env = {MESH_KEY_ENV: "env-key-0123456789abcdef"}
    assert resolve_mesh_key(key_file, env, state) == b"file-key-0123456789abcdef"
    assert resolve_mesh_key(None, env, state) == b"env-key-0123456789abcdef"
    assert resolve_mesh_key(None, {}, state) == stored


def test_an_invite_stores_its_key_privately_and_replaces_the_old_one(
        tmp_path: Path, no_umask: None, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "joiner"
    own = resolve_mesh_key(None, {}, state)
    with caplog.at_level(logging.WARNING, logger="daemon.net.meshkey"):
        assert resolve_mesh_key(None, {}, state, invite=invite_code(KEY)) == KEY
    assert any(key_id(own) in r.getMessage() and key_id(KEY) in r.getMessage() for r in caplog.records)
    assert mode(state / MESH_KEY_FILE) == 0o600
    assert resolve_mesh_key(None, {}, state) == KEY  # the next start keeps it, without --invite
    fresh = tmp_path / "fresh"
    assert resolve_mesh_key(None, {}, fresh, invite=invite_code(KEY)) == KEY
    assert mode(fresh) == 0o700 and mode(fresh / MESH_KEY_FILE) == 0o600


def test_only_open_gives_a_mesh_without_a_key(tmp_path: Path) -> None:
    assert resolve_mesh_key(None, {}, tmp_path / "s", open_mesh=True) is None
    assert not (tmp_path / "s" / MESH_KEY_FILE).exists()
    with pytest.raises(MeshKeyError, match="--open runs a mesh without a key, but MESHLLM_MESH_KEY"):
        resolve_mesh_key(None, {MESH_KEY_ENV: "env-key-0123456789abcdef"}, tmp_path, open_mesh=True)
    with pytest.raises(MeshKeyError, match="--open .* but --invite"):
        resolve_mesh_key(None, {}, tmp_path, open_mesh=True, invite=invite_code(KEY))
    with pytest.raises(MeshKeyError, match="--invite and MESHLLM_MESH_KEY both give a mesh key"):
        resolve_mesh_key(None, {MESH_KEY_ENV: "env-key-0123456789abcdef"}, tmp_path, invite=invite_code(KEY))


def test_a_broken_key_in_the_state_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / MESH_KEY_FILE).write_text("short\n")
    with pytest.raises(MeshKeyError, match=f"mesh key file {tmp_path / MESH_KEY_FILE} holds 5 bytes"):
        resolve_mesh_key(None, {}, tmp_path)


def test_the_config_checks_an_invite_and_contradictions_before_anything_starts() -> None:
    code = invite_code(KEY)
    assert NodeConfig.from_sources({"invite": code}, {}).invite == code
    assert NodeConfig.from_sources({}, {"MESHLLM_INVITE": code}).invite == code
    assert NodeConfig.from_sources({}, {"MESHLLM_OPEN": "yes"}).open_mesh
    with pytest.raises(ConfigError, match="mistyped"):
        NodeConfig.from_sources({"invite": code[:-3] + "aaa"}, {})
    with pytest.raises(ConfigError, match="--open runs a mesh without a key, but --invite"):
        NodeConfig.from_sources({"open_mesh": True}, {"MESHLLM_INVITE": code})
    with pytest.raises(ConfigError, match="--open runs a mesh without a key, but --mesh-key-file"):
        NodeConfig.from_sources({"open_mesh": True, "mesh_key_file": "k"}, {})
    with pytest.raises(ConfigError, match="--invite and --mesh-key-file"):
        NodeConfig.from_sources({"invite": code, "mesh_key_file": "k"}, {})


# -- meshllm invite -------------------------------------------------------------------------------


def test_meshllm_invite_prints_the_code_as_the_last_word(
        tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    key = resolve_mesh_key(None, {}, state)  # what the first `meshllm up` does
    assert main(["invite", "--state-dir", str(state)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1
    assert parse_invite(out.split()[-1]) == key
    assert out.startswith("meshllm up --invite ")
    assert key_id(key) in err and "only to your own devices" in err


def test_meshllm_invite_without_a_key_says_what_to_do(
        tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["invite", "--state-dir", str(tmp_path / "none")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("meshllm: no mesh key in ") and "`meshllm up`" in err and "--invite CODE" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists()  # nothing is created


def test_meshllm_invite_gives_the_key_meshllm_up_would_use(
        tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    resolve_mesh_key(None, {}, tmp_path)
    monkeypatch.setenv(MESH_KEY_ENV, KEY.decode())
    assert main(["invite", "--state-dir", str(tmp_path)]) == 0
    assert parse_invite(capsys.readouterr().out.split()[-1]) == KEY
    monkeypatch.delenv(MESH_KEY_ENV)
    monkeypatch.setenv("MESHLLM_OPEN", "1")
    assert main(["invite", "--state-dir", str(tmp_path)]) == 1
    assert "open mesh" in capsys.readouterr().err


# -- the key id on mDNS, and what the user sees ---------------------------------------------------


def test_the_mdns_record_carries_the_key_id_and_another_key_is_named() -> None:
    hello = Hello("n-0123456789abcdef", "laptop", PROTOCOL_VERSION, "default", "m" * 16, 8471, 1 << 30, 1.0, True)
    ident = key_id(KEY)
    txt = txt_for(hello, 8471, ident)
    assert txt["key"] == ident and KEY.decode() not in "".join(txt.values())
    parsed = parse_txt({k.encode(): v.encode() for k, v in txt.items()})
    assert parsed["key"] == ident
    with pytest.raises(BadRecord, match="bad key id"):
        parse_txt({**{k.encode(): v.encode() for k, v in txt.items()}, b"key": b"not-a-key-id"})
    assert key_mismatch(ident, ident) is None
    assert key_mismatch(ident, None) is None  # an older node: the handshake decides
    assert key_mismatch(ident, key_id(b"another key, 16+ bytes")) == "another mesh key"
    assert key_mismatch(ident, OPEN_KEY_ID) == "another mesh key (it runs an open mesh)"
    assert key_mismatch(OPEN_KEY_ID, ident) == "another mesh key (this node runs an open mesh)"


def status_json(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"self_id": "n-1", "model": None, "codec": "f32", "term": 0, "coordinator_id": "n-1",
                               "plan": None, "nodes": [], "incompatible": [],
                               "sessions": {"running": 0, "queued": 0, "max": 1, "queue_max": 4}}
    return {**base, **changes}


def test_the_mesh_view_shows_the_invite_and_warns_about_an_open_mesh() -> None:
    code = invite_code(KEY)
    facts = format_facts(MeshStatus.from_json(status_json(mesh_key_id=key_id(KEY), invite=code))).plain
    assert f"meshllm up --invite {code}" in facts
    facts = format_facts(MeshStatus.from_json(status_json(mesh_key_id="open", invite=None))).plain
    assert "open mesh: anyone on this network can join" in facts
    facts = format_facts(MeshStatus.from_json(status_json(
        incompatible=[{"name": "stranger", "address": "10.0.0.9:8471", "reason": "another mesh key"}]))).plain
    assert "stranger 10.0.0.9:8471 (another mesh key) — to join it: `meshllm invite` there" in facts


def test_meshllm_status_names_the_key_by_its_id_and_never_prints_the_code() -> None:
    code = invite_code(KEY)
    table = format_status(status_json(mesh_key_id=key_id(KEY), invite=code))
    assert key_id(KEY) in table and code not in table
    assert "open mesh" in format_status(status_json(mesh_key_id="open", invite=None))


# -- private files --------------------------------------------------------------------------------


def test_private_files_are_0600_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    path = tmp_path / "api.key"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret" and mode(path) == 0o600
    write_private(tmp_path / "new", b"x")
    assert mode(tmp_path / "new") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.key", "new"]  # no temporary left
    folder = make_private_dir(tmp_path / "a" / "b")
    assert mode(folder) == 0o700


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    make_private_dir(shared)
    assert mode(shared) == 0o755


def test_the_state_dir_and_the_node_id_are_private(tmp_path: Path, no_umask: None) -> None:
    state = tmp_path / "fresh" / "state"
    node_id = load_or_create_node_id(state)
    assert mode(state) == 0o700 and mode(state / NODE_ID_FILE) == 0o600
    assert load_or_create_node_id(state) == node_id
