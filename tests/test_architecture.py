"""The layers of docs/architecture.md, read from the source: every import between factory modules (ast, no code run)
points down the layer order or within a layer, train/ and eval/ never import each other, there is no import cycle,
and every import made inside a function says why on its line (or the comment line above)."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "factory"

# Bottom to top: a module may import modules of its own layer or of a layer listed before it (docs/architecture.md).
LAYERS = [
    ("core", ("factory.errors", "factory.constants", "factory.registry", "factory.text_files", "factory.safe_load",
              "factory.config", "factory.command_line", "factory.distributed", "factory.safe_checkpoint_engine")),
    ("model", ("factory.model",)),
    ("tuners", ("factory.tuners",)),
    ("stages", ("factory.stages",)),
    ("data", ("factory.data",)),
    ("checkpoint", ("factory.checkpoint", "factory.interop")),  # interop: other projects' layouts in and out
    ("config checks", ("factory.config_checks",)),  # the tuners validate their own options
    ("train/eval", ("factory.train", "factory.eval", "factory.harness")),  # harness: beside eval, reached by name
    ("tools", ("factory.params", "factory.testing", "factory.export", "factory.hf")),  # hf: tuners on HF Llava
    ("api", ("factory",)),  # factory/__init__.py: build_model and load_checkpoint, imported when called
]
NEVER = [("factory.train", "factory.eval"), ("factory.eval", "factory.train"), ("factory", "factory.train"),
         ("factory.harness", "factory.train"), ("factory.train", "factory.harness")]


def says_why(lines: List[str], lineno: int) -> bool:
    """A comment on the import's line, on another line of its block of imports, or on the line above the block."""
    i = lineno - 1
    while True:
        line = lines[i]
        if "#" in line and "noqa" not in line.split("#", 1)[1][:6]:
            return True
        above = lines[i - 1].strip() if i >= 1 else ""
        if above.startswith("#"):
            return True
        if not above.startswith(("from ", "import ")):
            return False
        i -= 1


@dataclass
class Import:
    importer: str
    target: str
    line: int
    local: bool      # inside a function (runs when called, hidden from a reader of the module's head)
    explained: bool  # a comment on the import's line or on the line above it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def known_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _target(node: ast.AST, name: Optional[str], modules: Dict[str, Path]) -> List[str]:
    """The factory modules an import statement loads (`from factory import checkpoint` loads factory.checkpoint)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "factory" or a.name.startswith("factory.")]
    if node.level or not node.module or not (node.module == "factory" or node.module.startswith("factory.")):
        return []
    out = []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.append(sub if sub in modules else node.module)
    return out


def read_imports(path: Path, modules: Dict[str, Path]) -> List[Import]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    found: List[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                explained = says_why(lines, child.lineno)
                for target in _target(child, None, modules):
                    found.append(Import(module_name(path), target, child.lineno, in_function, explained))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def read_local_third_party(path: Path) -> List[str]:
    """Function-local imports of other packages that carry no comment saying why."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    bad = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                    isinstance(node, ast.ImportFrom) and (node.module or "").startswith("factory")):
                if not says_why(lines, node.lineno):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return bad


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS and to docs/architecture.md"
    return rank


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.fixture(scope="module")
def imports() -> List[Import]:
    modules = known_modules()
    return [imp for path in sorted(modules.values()) for imp in read_imports(path, modules)]


def direction_faults(imports: List[Import]) -> List[str]:
    faults = []
    for imp in imports:
        if imp.target == "factory":  # the package itself (every `factory.x` import runs its __init__ anyway)
            continue
        if layer_of(imp.target) > layer_of(imp.importer):
            faults.append(f"{imp.importer}:{imp.line} imports {imp.target}, a layer above it "
                          f"({LAYERS[layer_of(imp.target)][0]} over {LAYERS[layer_of(imp.importer)][0]})")
        for low, high in NEVER:
            if within(imp.importer, low) and within(imp.target, high) and not (low == "factory" and imp.importer != low):
                faults.append(f"{imp.importer}:{imp.line} imports {imp.target}: {low} must never import {high}")
        # components must not reach into the module that composes them, nor into a tuner's internals
        if within(imp.importer, "factory.model") and imp.target == "factory.model.build" and \
                imp.importer not in ("factory.model", "factory.model.build"):
            faults.append(f"{imp.importer}:{imp.line} imports factory.model.build (use factory.model.loading)")
        if within(imp.target, "factory.tuners") and imp.target != "factory.tuners" and \
                not within(imp.importer, "factory.tuners"):
            faults.append(f"{imp.importer}:{imp.line} imports {imp.target}: use the public factory.tuners API")
    return faults


def cycles(imports: List[Import]) -> List[List[str]]:
    """Import cycles among module-level imports (Tarjan's strongly connected components)."""
    graph: Dict[str, set] = {}
    for imp in imports:
        if not imp.local and imp.target != imp.importer and imp.target != "factory":
            graph.setdefault(imp.importer, set()).add(imp.target)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack = set()
    found: List[List[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            # a package __init__ importing its own submodules, which import siblings, is not a cycle by itself
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            strong(node)
    return found


def test_every_module_has_a_layer(imports):
    for module in known_modules():
        layer_of(module)


def test_imports_point_down_the_layers(imports):
    assert direction_faults(imports) == []


def test_no_import_cycle(imports):
    assert cycles(imports) == []


def test_local_imports_of_factory_modules_say_why(imports):
    hidden = [f"{i.importer}:{i.line} imports {i.target} inside a function without a comment saying why"
              for i in imports if i.local and not i.explained]
    assert hidden == []


def test_local_imports_of_other_packages_say_why():
    assert [bad for path in sorted(PACKAGE.rglob("*.py")) for bad in read_local_third_party(path)] == []


def test_the_checker_catches_each_kind_of_fault(tmp_path):
    """The rules above can fail: a fake eval→train import, an upward import, a cycle and a hidden local import."""
    fake = [Import("factory.eval.cli", "factory.train.recipe", 1, False, False),
            Import("factory.model.llms", "factory.data.templates", 2, False, False),
            Import("factory.model.vision.base", "factory.model.build", 3, False, False),
            Import("factory.stages", "factory.tuners.freeze", 4, False, False),
            Import("factory", "factory.train", 5, True, True)]
    faults = direction_faults(fake)
    assert len(faults) == 5, faults
    assert "factory.eval must never import factory.train" in faults[0]
    assert "a layer above it (data over model)" in faults[1]
    loop = [Import("factory.eval.cli", "factory.eval.imbalance", 1, False, False),
            Import("factory.eval.imbalance", "factory.eval.cli", 9, False, False)]
    assert cycles(loop) == [["factory.eval.cli", "factory.eval.imbalance"]]
    source = tmp_path / "factory" / "x.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from factory.model import build\n\n\ndef g():\n    # why: heavy\n"
                      "    from factory import checkpoint\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = read_imports(source, {"factory.checkpoint": source})
    finally:
        ROOT = saved
    assert [(i.target, i.local, i.explained) for i in found] == [("factory.model", True, False),
                                                                  ("factory.checkpoint", True, True)]
