"""The layering rules of the design: meshllm/ pulls in no networking and no UI."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

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


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name (relative imports excluded)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_scripts_do_not_import_the_tests() -> None:
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert scripts, "no scripts found"
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "tests")
                 for p in scripts}
    assert {path: mods for path, mods in offenders.items() if mods} == {}
