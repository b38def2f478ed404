"""A serving node imports what it serves with, not what only tuning or the UI needs (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

TUNING_AND_UI = ("peft", "textual", "tui.app", "meshllm.tune.train")
"""Imported by `meshllm tune` / a training round and by the terminal UI, never by a node starting."""


def _loaded_after(code: str) -> set[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_node_imports_neither_tuning_nor_ui() -> None:
    loaded = _loaded_after("import daemon.node.node, daemon.api.tune, daemon.node.tune")
    assert sorted(m for m in TUNING_AND_UI if m in loaded) == []


def test_the_command_line_imports_no_model_code_before_a_command_runs() -> None:
    loaded = _loaded_after("import daemon.cli")
    assert sorted(m for m in ("torch", "transformers", "aiortc", "peft", "textual") if m in loaded) == []
