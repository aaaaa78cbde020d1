"""The package's import graph has no cycles and no function-local imports of project modules (the usual way
to hide a cycle): the layer list in README.md holds."""
import ast
import os
import re

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "dcp_resume")


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                out[name] = path
    return out


def _imports(name: str, path: str, modules: dict) -> tuple[set, list]:
    """(project modules imported at module level, function-local project imports as 'line: module')."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    top, local = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
        elif node.module and node.module.split(".")[0] == "dcp_resume":
            target = node.module
        else:
            continue
        named = [f"{target}.{a.name}" for a in node.names]  # `from . import x`: the submodules, not the package
        found = {c for c in ([target] if node.module else []) + named if c in modules and c != name}
        if node.col_offset > 0:
            local += [f"{node.lineno}: {c}" for c in sorted(found)]
        top |= found - {"dcp_resume"}  # the package itself: only its __version__, set before any import
    return top, local


def test_no_cycles_and_no_function_local_imports():
    modules = _modules()
    graph, local = {}, {}
    for name, path in modules.items():
        graph[name], found = _imports(name, path, modules)
        if found:
            local[name] = found
    assert local == {}, f"function-local imports of project modules (a hidden cycle?): {local}"
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in done:
            return
        stack.append(m)
        for d in sorted(graph[m]):
            if d != "dcp_resume":
                visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        if m != "dcp_resume":
            visit(m)
    assert len(done) > 30  # the walk saw the package


def test_test_tiers_are_their_directories():
    """tests/integration: every module marked slow as a whole (module-level pytestmark); tests/unit: nothing
    marked slow, so `-m "not slow"` is exactly the unit tier."""
    def text(tier, f):
        return open(os.path.join(ROOT, "tests", tier, f)).read()

    tiers = {tier: sorted(f for f in os.listdir(os.path.join(ROOT, "tests", tier)) if f.startswith("test_"))
             for tier in ("unit", "integration")}
    unmarked = [f for f in tiers["integration"]
                if not re.search(r"^pytestmark = pytest\.mark\.slow", text("integration", f), re.M)]
    slow_units = [f for f in tiers["unit"] if re.search(r"^(@|pytestmark = )pytest\.mark\.slow", text("unit", f), re.M)]
    assert (unmarked, slow_units) == ([], []), "move the module to the tier it belongs to"
    loose = [f for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_")]
    assert loose == [], "tests/test_*.py: put each module in tests/unit or tests/integration"
    assert len(tiers["unit"]) > 15 and len(tiers["integration"]) > 15


def _private_torch_names(tree: ast.AST) -> list[str]:
    """'line: name' for every private torch name (a `_part` of a torch module path, imported or reached through
    attributes of `torch`) in a module's syntax tree; dunders such as torch.__version__ are public."""
    def private(parts) -> bool:
        return parts[0] == "torch" and any(p.startswith("_") and not p.startswith("__") for p in parts)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            names = [".".join([inner.id, *reversed(chain)])] if isinstance(inner, ast.Name) else []
        else:
            continue
        found += [f"{node.lineno}: {n}" for n in names if private(n.split("."))]
    return found


def test_every_private_torch_name_is_in_compat():
    """dcp_resume/compat.py holds every private torch name the package uses, with the versions it was checked
    against; a torch release that moves one breaks there, by name. (Before it existed, six modules held 15.)"""
    modules = _modules()
    elsewhere = {name: found for name, path in modules.items() if name != "dcp_resume.compat"
                 and (found := _private_torch_names(ast.parse(open(path).read())))}
    assert elsewhere == {}, f"import these from dcp_resume.compat: {elsewhere}"
    assert _private_torch_names(ast.parse(open(modules["dcp_resume.compat"]).read()))  # the check sees them
