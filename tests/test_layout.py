"""Package layout rules: no import cycles, packages depend only downward, no module imports another
package's underscored names, explicit re-exports, typed package."""

from __future__ import annotations

import ast
import importlib
import os

import jmerge

ROOT = os.path.dirname(jmerge.__file__)

# Which top-level packages each package may import (module-level or inside functions).
ALLOWED = {
    "version": set(),
    "core": set(),
    "methods": {"core", "kernels"},
    "learned": {"core", "methods"},
    "io": {"core"},
    "mergekit": {"core", "methods"},
    "pipeline": {"core", "io", "mergekit"},
    "kernels": set(),
    "models": {"core", "io", "kernels"},
    "moe": {"core", "io", "mergekit", "pipeline", "models"},
    "lora": {"core", "methods", "io"},
    "sweep": {"core", "methods", "io", "mergekit", "pipeline", "models"},
    "dynamic": {"core", "methods", "io", "kernels", "lora", "models"},
    "cli": {"core", "methods", "io", "mergekit", "pipeline", "demo", "models", "moe", "lora", "sweep", "dynamic", ""},
    "demo": {"core", "methods", "learned", "sweep", "dynamic", ""},
}


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(modname, path):
    """(target module, imported names, module-level?) of every import in a module."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_pkg = path.endswith("__init__.py")
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = modname.split(".") if is_pkg else modname.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x -> modules
                for n in names:
                    out.append((f"{target}.{n}", [], id(node) in top_level))
            else:
                out.append((target, names, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], id(node) in top_level))
    return out


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_depend_only_downward():
    bad = []
    for mod, path in _modules():
        pkg = _package(mod)
        if pkg not in ALLOWED:
            continue
        for target, _, _ in _imports(mod, path):
            if target == "jmerge" or target.startswith("jmerge."):
                tp = _package(target)
                if tp != pkg and tp != "version" and tp not in ALLOWED[pkg]:
                    bad.append(f"{mod} imports {target}")
    assert not bad, bad


def test_no_import_cycles_at_module_level():
    mods = dict(_modules())
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, top in _imports(mod, path):
            if not top or not target.startswith("jmerge"):
                continue
            cands = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods] or ([target] if target in mods else [])
            graph[mod].update(c for c in cands if c != mod)
    # a package __init__ importing its own submodules is not a cycle through them
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if t.startswith(m + "."):
                continue
            if state.get(t) == 1 and not m.startswith(t + "."):
                cycles.append(stack + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_module_imports_another_packages_underscored_names():
    bad = []
    for mod, path in _modules():
        pkg = _package(mod)
        for target, names, _ in _imports(mod, path):
            if not target.startswith("jmerge.") or _package(target) == pkg:
                continue
            if any(p.startswith("_") for p in target.split(".")):
                bad.append(f"{mod} imports module {target}")
            bad += [f"{mod} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_top_level_exports_are_explicit_and_resolve():
    """``jmerge/__init__.py`` re-exports lazily (PEP 562) from a literal table ``{package: names}``: every name
    is declared once, matches the ``if TYPE_CHECKING:`` import of it from the same package, and resolves to
    that package's own object; the only dynamic imports are the two in ``__getattr__``."""
    src = open(os.path.join(ROOT, "__init__.py"), encoding="utf-8").read()
    assert "globals()" not in src and src.count("import_module(") == 2
    tree = ast.parse(src)
    table, typed = None, {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS_BY_PACKAGE":
            table = ast.literal_eval(node.value)  # a literal: nothing computed
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                typed.update({a.name: imp.module for a in imp.names if a.asname is None})
    assert table, "jmerge/__init__.py: no literal _EXPORTS_BY_PACKAGE table"
    declared = {n: pkg for pkg, names in table.items() for n in names}
    assert len(declared) == sum(len(v) for v in table.values())
    assert declared == typed
    assert set(jmerge.__all__) == set(declared) | {"__version__", "available_methods"}
    assert len(set(jmerge.__all__)) == len(jmerge.__all__) and set(jmerge.__all__) <= set(dir(jmerge))
    for n, pkg in declared.items():
        assert getattr(jmerge, n) is getattr(importlib.import_module(f"jmerge.{pkg}"), n), n
    assert not hasattr(jmerge, "not_a_jmerge_name")
    for name in ("core", "methods", "learned", "io", "mergekit", "pipeline"):
        mod = getattr(jmerge, name)
        assert all(hasattr(mod, n) for n in mod.__all__), name


def test_typed_package_and_lean_dependencies():
    assert os.path.isfile(os.path.join(ROOT, "py.typed"))
    pyproject = open(os.path.join(os.path.dirname(ROOT), "pyproject.toml"), encoding="utf-8").read()
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    for heavy in ("matplotlib", "scikit-learn", "pydantic", "tqdm", "torch"):
        assert heavy not in deps, heavy
    for mod, path in _modules():
        if _package(mod) in ("demo",):
            continue
        for target, _, _ in _imports(mod, path):
            assert target.split(".")[0] not in ("matplotlib", "sklearn", "pydantic", "tqdm", "torch"), (mod, target)
