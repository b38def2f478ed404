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


CHECKED_MODULES = ("meshllm.wire", "meshllm.placement.planner", "meshllm.placement.cost", "meshllm.placement.search",
                   "meshllm.placement.targets", "meshllm.mesh.election", "meshllm.mesh.session", "meshllm.mesh.plans",
                   "meshllm.placement.balance", "meshllm.mesh", "meshllm.tune.rounds", "meshllm.tune.interface",
                   "meshllm.tune.adapters", "meshllm.tune.coordinator", "meshllm.tune.participant",
                   "meshllm.tune.member")
"""The core library's pure parts. Each must exist: a renamed module fails the test rather than
escaping it."""


def test_import_meshllm_loads_no_networking_or_ui() -> None:
    code = (
        "import json, sys\n"
        "import meshllm, meshllm.errors\n"
        f"for m in {CHECKED_MODULES!r}:\n"
        "    __import__(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN + ("torch", "asyncio"))
    assert bad == []


SANS_IO = ("meshllm/mesh", "meshllm/wire", "meshllm/placement", "meshllm/tune/rounds.py", "meshllm/tune/interface.py",
           "meshllm/tune/adapters.py", "meshllm/tune/coordinator.py", "meshllm/tune/participant.py", "meshllm/tune/member.py",
           "meshllm/tune/aggregate.py")
"""State machines and pure functions: fed `now`, they never read the clock, sleep, spawn or
touch a socket (design §4)."""

NO_IO = ("time", "asyncio", "threading", "socket", "select", "selectors", "concurrent", "subprocess",
         "torch", "transformers")


def sans_io_files() -> list[Path]:
    files: list[Path] = []
    for entry in SANS_IO:
        path = REPO / entry
        assert path.exists(), f"{entry} is gone: update SANS_IO in this test"
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_the_sans_io_modules_read_no_clock_and_touch_no_threads_sockets_or_torch() -> None:
    offenders = {}
    for path in sans_io_files():
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in NO_IO + FORBIDDEN)
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_the_layering_check_sees_a_forbidden_import() -> None:
    """The check itself: a file that reads the clock is caught."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe.py"
        probe.write_text("from time import monotonic\nimport asyncio.tasks\n")
        assert {m.split(".")[0] for m in imported_modules(probe)} >= {"time", "asyncio"}


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


MAX_MODULE_LINES = 600
MAX_CLASS_METHODS = 30
"""One concept per module (issue 19): no production module over 600 lines, no class with
more than 30 methods, and every module's docstring says what it is."""


def _production_modules() -> list[Path]:
    return sorted(p for pkg in ("meshllm", "daemon", "tui") for p in (REPO / pkg).rglob("*.py"))


def test_every_production_module_is_small_and_says_what_it_is() -> None:
    import ast

    too_long, too_wide, silent = [], [], []
    for path in _production_modules():
        text = path.read_text()
        name = str(path.relative_to(REPO))
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(name)
        tree = ast.parse(text)
        if text.strip() and ast.get_docstring(tree) is None:
            silent.append(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if len(methods) > MAX_CLASS_METHODS:
                    too_wide.append(f"{name}:{node.name} ({len(methods)})")
    assert too_long == [] and too_wide == [] and silent == []
