"""The daemon's layers without leaks: which of its packages may import which, and no cycles.

- ``daemon/api`` (HTTP) imports nothing of ``daemon/node`` or ``daemon/net``;
- ``daemon/net`` (links, discovery) imports nothing of ``daemon/node`` or ``daemon/api``;
- ``daemon/node``'s parts import nothing of ``daemon/api`` or ``daemon/net``, except
  ``daemon/node/node.py``, the composition root, which wires them all together;
- the neutral modules beside them (``daemon/answer.py``, ``daemon/tasks.py``, ...) import none
  of the three;
- ``tui/`` talks to a daemon only over HTTP: it imports nothing of ``daemon``;
- and no import cycle among the modules of ``daemon/`` and ``tui/``.

Imports under ``if TYPE_CHECKING:`` are for the type checker only and do not count; imports
inside functions (lazy ones) count like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("daemon", "tui")
COMPOSITION_ROOT = "daemon.node.node"


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (their ``else:`` counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def runtime_imports(source: str, module: str, known: set[str]) -> set[str]:
    """The modules among `known` that `module`'s source imports at run time (a package's
    ``from pkg import mod`` counts as the module; relative imports are resolved)."""
    found: set[str] = set()
    package = module if module in known and _is_package(module, known) else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _deepest_known(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def _is_package(module: str, known: set[str]) -> bool:
    return any(other.startswith(module + ".") for other in known)


def _deepest_known(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports at run time. Packages' ``__init__``
    modules are left out as targets (importing ``daemon.node.x`` runs ``daemon/node/__init__``,
    which is a package marker, not a layer)."""
    files = {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}
    known = set(files)
    modules = {m for m in known if not _is_package(m, known)}
    graph = {}
    for module, path in files.items():
        imported = runtime_imports(path.read_text(encoding="utf-8"), module, known)
        graph[module] = {m for m in imported if m in modules}
    return graph


def layer(module: str) -> str:
    if module == COMPOSITION_ROOT:
        return "root"
    for prefix, name in (("daemon.api", "api"), ("daemon.net", "net"), ("daemon.node", "node"),
                         ("daemon.cli", "cli"), ("tui", "tui")):
        if module == prefix or module.startswith(prefix + ".") or \
                (prefix == "daemon.cli" and module.startswith("daemon.cli_")):
            return name
    return "neutral"


FORBIDDEN = {
    "api": {"node", "root", "net", "cli", "tui"},
    "net": {"node", "root", "api", "cli", "tui"},
    "node": {"api", "net", "root", "cli", "tui"},
    "neutral": {"api", "net", "node", "root", "cli", "tui"},
    "tui": {"api", "net", "node", "root", "cli", "neutral"},
    "root": {"cli", "tui"},
    "cli": set(),
}
"""Layer -> the layers it must not import at run time."""


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                  if layer(target) in FORBIDDEN[layer(source)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the rules, on this repository ----------------------------------------------------------------


def test_no_layer_imports_what_it_must_not() -> None:
    graph = import_graph()
    assert COMPOSITION_ROOT in graph and "daemon.api.app" in graph  # the layout this test knows
    assert forbidden_edges(graph) == []


def test_no_import_cycle_among_the_daemon_and_tui_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_cycle_among_the_layers_either() -> None:
    """``daemon/api`` and ``daemon/node`` once imported each other (the node wired the API, the
    API took the node's types): module by module no cycle, layer by layer one."""
    def package(module: str) -> str:  # the composition root is part of daemon/node here
        return "node" if layer(module) == "root" else layer(module)

    packages: dict[str, set[str]] = {}
    for source, targets in import_graph().items():
        packages.setdefault(package(source), set()).update(
            package(t) for t in targets if package(t) != package(source))
    assert cycles(packages) == []


def test_the_composition_root_is_the_one_module_that_wires_api_node_and_net() -> None:
    graph = import_graph()
    wiring = sorted(m for m, targets in graph.items()
                    if {layer(t) for t in targets} >= {"api", "node", "net"})
    assert wiring == [COMPOSITION_ROOT]


# -- the checker itself ----------------------------------------------------------------------------


def _graph_of(tmp_path: Path, sources: dict[str, str]) -> dict[str, set[str]]:
    for name, source in sources.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        for parent in path.relative_to(tmp_path).parents:
            if parent != Path("."):
                (tmp_path / parent / "__init__.py").touch()
    return import_graph(tmp_path, ("daemon",))


def test_the_checker_sees_lazy_and_package_imports_and_skips_type_only_ones(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "daemon.api.app": "from typing import TYPE_CHECKING\n"
                          "if TYPE_CHECKING:\n    from daemon.node.driver import MeshDriver\n"
                          "def handler():\n    from daemon.node import worker\n",
        "daemon.node.driver": "import daemon.net.links\n",
        "daemon.node.worker": "from . import driver\n",
        "daemon.net.links": "",
    })
    assert graph["daemon.api.app"] == {"daemon.node.worker"}
    assert graph["daemon.node.worker"] == {"daemon.node.driver"}
    assert forbidden_edges(graph) == ["daemon.api.app -> daemon.node.worker",
                                      "daemon.node.driver -> daemon.net.links"]


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "daemon.api.app": "from daemon.api.tune import x\n",
        "daemon.api.tune": "def start():\n    from daemon.api.app import y\n",
        "daemon.api.status": "from daemon.api import events\n",
        "daemon.api.events": "",
    })
    assert cycles(graph) == [["daemon.api.app", "daemon.api.tune"]]


def test_no_import_cycle_among_the_core_library_modules() -> None:
    """The same rule for ``meshllm/``: its roles, rooms and the wire import in one direction
    (a role of the mesh core never imports the core; the tune messages do not import the
    other messages)."""
    assert cycles(import_graph(packages=("meshllm",))) == []
