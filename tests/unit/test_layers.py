"""The import contracts: the layers docs/architecture.md draws, enforced.

Read from the source with `ast` (every import, at module level or inside a
function, and every module named in a string, as for ``importlib.import_module``),
so a contract holds for code that runs late too; imports under ``if
TYPE_CHECKING:`` are left out, as they never run.  Bottom to top:

    base        engine.errors, scatter, units, poll    standard library only
    wire        engine.wire.*                          + engine.errors, numpy, xxhash and
                                                       cryptography (bitmaps, page checksums,
                                                       record tags)
    io          engine.sync, shm, space, tracker, codecs, config, transport, link, pool.*
    core        engine.slots, dirty, converge, stats, verify, channel, multifd, payload,
                device, admission, scrub
    operations  engine.operation, migration, saving, source, destination, snapshot
    app         engine (the facade), engine.cli.*, engine.console (the console script)

A module may import its own layer and the layers below it, never above, and no
two modules import each other, directly or around a cycle.  Plug-ins sit beside
the engine: transports see only the transport interface, clients see the core
but no operation, and the engine (the CLI apart) names neither of them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "clients", "transports")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("engine.errors", "engine.scatter", "engine.units", "engine.poll")),
    ("wire", ("engine.wire",)),
    ("io", ("engine.sync", "engine.shm", "engine.space", "engine.tracker", "engine.codecs", "engine.config",
            "engine.transport", "engine.link", "engine.pool")),
    ("core", ("engine.slots", "engine.dirty", "engine.stats", "engine.verify", "engine.channel",
              "engine.multifd", "engine.payload", "engine.device", "engine.admission",
              "engine.main_channel", "engine.pages", "engine.converge", "engine.scrub")),
    ("operations", ("engine.operation", "engine.migration", "engine.saving", "engine.source",
                    "engine.destination", "engine.snapshot")),
    ("app", ("engine.console", "engine.cli", "engine")),
]

# What a plug-in package may import from the engine.
TRANSPORT_INTERFACE = ("engine.errors", "engine.scatter", "engine.sync", "engine.transport", "engine.units")
OPERATIONS = dict(LAYERS)["operations"] + dict(LAYERS)["app"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` but those under ``if TYPE_CHECKING:`` (annotations
    only: they never run, so they cannot make a cycle or break a layer at run
    time)."""
    nodes: list[ast.AST] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (the project's resolved to modules), or
    names in a string that is exactly a module's name."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*head, base] if base else head)
            submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(base)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func).endswith("import_module")):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and node.value in MODULES and "." in node.value:
            found.add(node.value)  # a module named in a string, to be imported later
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Is `name` one of `prefixes` or inside one?  (The facade, ``engine``,
    stands for itself only, not for every engine module.)"""
    return any(name == p or (p != "engine" and name.startswith(p + ".")) for p in prefixes)


def _layer(name: str) -> int | None:
    """The index in LAYERS of the longest prefix that names `name`'s layer."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _under(name, (prefix,)):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def test_every_engine_module_has_a_layer() -> None:
    orphans = [m for m in MODULES if m.startswith("engine") and _layer(m) is None]
    assert not orphans, f"add these modules to a layer in LAYERS: {orphans}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for module, imported in GRAPH.items():
        here = _layer(module)
        if here is None:
            continue
        for target in imported:
            there = _layer(target)
            if there is not None and there > here:
                upward.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_base_and_wire_depend_on_nothing_above() -> None:
    """The base uses the standard library only; the wire (sans-IO codecs) adds
    the errors and three computation libraries, never I/O or engine state."""
    stdlib = sys.stdlib_module_names | {"__future__"}
    wrong = []
    for module, imported in GRAPH.items():
        if _under(module, dict(LAYERS)["base"]):
            allowed: tuple[str, ...] = ()
        elif _under(module, ("engine.wire",)):
            allowed = ("engine.errors", "engine.wire", "numpy", "xxhash", "cryptography")
        else:
            continue
        wrong += [f"{module} imports {target}" for target in imported
                  if target.split(".")[0] not in stdlib and not _under(target, allowed)]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the project's modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", ["engine", "clients", "transports"])
def test_plug_ins_sit_beside_the_engine(package: str) -> None:
    wrong = []
    for module, imported in GRAPH.items():
        if module.split(".")[0] != package:
            continue
        for target in filter(_project, imported):
            cli = _under(module, ("engine.cli",))  # the composition root wires plug-ins in
            if package == "engine" and not cli and target.split(".")[0] != "engine":
                wrong.append(f"{module} names {target}: the engine finds plug-ins through registries")
            if package == "transports" and _under(target, ("engine",)) \
                    and not _under(target, TRANSPORT_INTERFACE):
                wrong.append(f"{module} imports {target}, outside the transport interface")
            if package == "clients" and _under(target, OPERATIONS):
                wrong.append(f"{module} imports the operation {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checker_sees_imports_inside_functions_and_by_name(tmp_path: Path) -> None:
    """The contracts are only as good as the import reader: it must see a
    function-level import and an ``importlib.import_module`` call."""
    source = tmp_path / "probe.py"
    source.write_text("import importlib\nfrom typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from engine import cli\n"
                      "def late():\n"
                      "    from engine import source\n"
                      "    return importlib.import_module('transports.tcp'), source\n"
                      "LATER = {'ram': 'clients.ram_payload'}\n")
    found = _imports("engine.probe", source)
    assert {"engine.source", "transports.tcp", "importlib", "clients.ram_payload"} <= found
    assert "engine.cli" not in found  # for the type checker only
