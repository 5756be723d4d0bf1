"""The shape of the core (docs/architecture.md): no import cycle, the plug-in never imported by the
core, every core module importable on its own, documented, and of a readable size.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import``
anywhere in a module (function-level imports included, since an import made lazily to dodge
a cycle is still a cycle in the design; ``if TYPE_CHECKING:`` blocks excluded, they never run)
and every ``importlib.import_module("fxrewrite...")``.
"""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fxrewrite"
PLUGIN = "fxrewrite.yolov9"
# A core module longer than this says why in its docstring ("Why this module is long: ...").
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
CORE = {name: path for name, path in MODULES.items() if not (name == PLUGIN or name.startswith(PLUGIN + "."))}


def _resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute name ``from <level dots><module>`` refers to inside ``importer``."""
    if level == 0:
        return module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    base = package.split(".")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str) -> set[str]:
    """The fxrewrite modules ``name`` imports (a package counts as its ``__init__``)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # ``if TYPE_CHECKING:`` imports are for annotations: they never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node.level, node.module)
            # ``from . import registry`` imports the module fxrewrite.registry; ``from .x import y`` imports x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:
                target = target.rpartition(".")[0]  # an attribute of a module: the module
            if target in MODULES and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_import_graph_is_read():
    assert "fxrewrite.registry" in GRAPH["fxrewrite.actions.collapse"]
    assert "fxrewrite.context" in GRAPH["fxrewrite.actions.collapse"]
    assert "fxrewrite.draw" in GRAPH["fxrewrite.result"]  # RewriteResult.draw, a function-level import
    assert "fxrewrite.actions" in GRAPH["fxrewrite"]


def test_the_core_has_no_import_cycle():
    core = {name: GRAPH[name] & set(CORE) for name in CORE}
    try:
        order = list(graphlib.TopologicalSorter(core).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle in the core: {' -> '.join(exc.args[1])}")
    assert set(order) == set(CORE)


# The steps of docs/architecture.md, in order; a module imports only its own step, earlier ones and
# the shared helpers (step 0). The one exception: RewriteResult.draw imports the drawing code lazily.
STEPS = ["shared", "trace", "match", "act", "validate", "rebind", "verify", "draw", "cli", "root"]
STEP_OF = {
    "naming": "shared", "tensors": "shared", "errors": "shared", "io": "shared", "safe_yaml": "shared",
    "serialization": "shared", "output_files": "shared",
    "examples": "shared",
    "tracing": "trace", "provenance": "trace", "shapes": "trace", "conv_shapes": "trace",
    "pattern": "match", "rule_file": "match", "rule_tables": "match", "yaml_lines": "match", "rules": "match",
    "registry": "match", "checks": "match",
    "context": "act", "call_sites": "act", "graph_copy": "act", "actions": "act", "modules": "act",
    "engine": "validate", "result": "validate",
    "rebind": "rebind", "verify": "verify", "draw": "draw", "nxgraph": "draw", "cli": "cli", "gcpause": "shared", "rewrite_cli": "cli",
}
LAZY_UPWARD = {("fxrewrite.result", "fxrewrite.draw")}


def step(name: str) -> int:
    if name == "fxrewrite":
        return STEPS.index("root")
    return STEPS.index(STEP_OF[name.split(".")[1]])


def test_every_core_module_has_a_step():
    assert {name.split(".")[1] for name in CORE if name != "fxrewrite"} == set(STEP_OF)


def test_no_core_module_imports_a_later_step():
    upward = sorted((name, target) for name in CORE for target in GRAPH[name] & set(CORE)
                    if step(target) > step(name) and (name, target) not in LAZY_UPWARD
                    and not (name == "fxrewrite.cli" and target == "fxrewrite"))
    assert upward == []


def test_only_the_cli_imports_the_composition_root():
    importers = sorted(name for name in CORE if "fxrewrite" in GRAPH[name])
    assert importers == ["fxrewrite.cli"]  # the CLI, at the top, for its demo


def test_the_core_never_imports_the_plug_in():
    for name in CORE:
        assert not any(t == PLUGIN or t.startswith(PLUGIN + ".") for t in GRAPH[name]), name


def test_the_engine_does_not_import_drawing_code():
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for t in GRAPH[todo.pop()]:
                if t not in seen and t != "fxrewrite.result":  # result.draw is the one (lazy) way there
                    seen.add(t)
                    todo.append(t)
        return seen

    assert not {m for m in reach("fxrewrite.engine") if m.startswith("fxrewrite.draw")}
    assert not {m for m in GRAPH["fxrewrite.draw"] | set().union(*(GRAPH[m] for m in CORE if m.startswith(
        "fxrewrite.draw."))) if m in ("fxrewrite.engine", "fxrewrite.result")}


def test_each_core_module_imports_on_its_own():
    """In one fresh interpreter, each core module is imported with no fxrewrite module loaded before
    it (every fxrewrite module is dropped from sys.modules between two): an import that only works
    after another module was imported fails here. (torch stays loaded: one interpreter per module
    would cost a torch import each.)"""
    code = f"""if True:
        import importlib, sys
        failed = []
        for name in {sorted(CORE)!r}:
            for loaded in [m for m in sys.modules if m == "fxrewrite" or m.startswith("fxrewrite.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
        print("\\n".join(failed) or "ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ok", out.stdout


@pytest.mark.parametrize("name", sorted(MODULES))  # the core and the plug-in alike
def test_each_module_says_what_it_owns_and_is_readable(name):
    text = MODULES[name].read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring and len(docstring.split()) >= 8, f"{name} needs a docstring saying what it owns"
    lines = text.count("\n")
    assert lines <= MAX_LINES or "Why this module is long:" in docstring, \
        f"{name} has {lines} lines; split it, or say why at its top"


def test_architecture_md_names_every_core_module():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, path in CORE.items():
        if name == "fxrewrite":
            continue
        shown = f"`{path.name}`" if path.parent == PACKAGE else f"`{path.parent.name}/`"
        assert shown in doc, f"docs/architecture.md does not place {name} ({shown})"


# -- the YOLOv9 plug-in ------------------------------------------------------------------------
PLUG_IN = {name: path for name, path in MODULES.items() if name not in CORE}


def private_imports(name: str) -> list[str]:
    """``from <fxrewrite module> import _name`` in ``name``: a private helper of another module."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = _resolve(name, node.level, node.module)
            if base.startswith("fxrewrite"):
                found += [f"{base}.{alias.name}" for alias in node.names
                          if alias.name.startswith("_") and f"{base}.{alias.name}" not in MODULES]
    return found


def test_the_private_import_check_sees_one():
    assert private_imports("fxrewrite.yolov9.checkpoint") == []
    tree_source = "from .convert import _helper\nfrom __future__ import annotations\n"
    assert [n.names[0].name for n in ast.walk(ast.parse(tree_source)) if isinstance(n, ast.ImportFrom)
            and n.names[0].name.startswith("_") and n.module != "__future__"] == ["_helper"]


@pytest.mark.parametrize("name", sorted(PLUG_IN))
def test_plug_in_modules_use_only_public_names_of_each_other(name):
    assert private_imports(name) == [], f"{name} imports private helpers: give them public names"


def test_the_plug_in_lists_its_blocks_in_one_place():
    """Block classes are listed in the catalogue only: no other plug-in module writes a table of
    block names (a module's ``__all__`` lists its own names, not a table)."""
    for name, path in PLUG_IN.items():
        if name.endswith(".catalogue"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        exported = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in node.targets)}  # a module's own names
        tables = [node for node in ast.walk(tree) if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict))
                  and id(node) not in exported
                  and sum(isinstance(e, ast.Constant) and e.value in BLOCK_NAMES
                          for e in getattr(node, "elts", None) or getattr(node, "keys", [])) >= 5]
        assert tables == [], f"{name} writes a list of block names (line {tables[0].lineno}); use the catalogue"


BLOCK_NAMES = {"Conv", "AConv", "ADown", "ELAN1", "RepConvN", "RepNBottleneck", "RepNCSP", "RepNCSPELAN4", "SP",
               "SPPELAN", "CBLinear", "CBFuse", "Silence", "Concat", "Detect", "DDetect", "DualDetect",
               "DualDDetect", "TripleDetect", "TripleDDetect", "Segment", "DSegment", "DualDSegment"}


def test_the_plug_in_modules_have_no_import_cycle():
    # The package's __init__ imports its modules to register them; among the modules, no cycle.
    modules = set(PLUG_IN) - {PLUGIN}
    graph = {name: GRAPH[name] & modules for name in modules}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle in the plug-in: {' -> '.join(exc.args[1])}")
    assert set(order) == modules
