"""The layering rules of the design: meshllm/ pulls in no networking and no UI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO

FORBIDDEN = ("aiortc", "aioice", "zeroconf", "textual", "aiohttp", "daemon", "tui")


def test_import_meshllm_loads_no_networking_or_ui() -> None:
    code = (
        "import json, sys\n"
        "import meshllm, meshllm.errors\n"
        "for m in ('meshllm.wire', 'meshllm.planner', 'meshllm.election'):\n"
        "    try:\n"
        "        __import__(m)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert bad == []


def test_no_module_under_meshllm_imports_networking_or_ui() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(" + "|".join(FORBIDDEN) + r")\b", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "meshllm").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
