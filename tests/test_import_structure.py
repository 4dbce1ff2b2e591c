"""The import structure of autoinit_tf and cli, read from the source with `ast` (imports inside
functions included): no cycle between modules, and no `_private` name taken from another module."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"autoinit_tf": "autoinit_tf", "autoinit_tf_cli": "cli"}  # import name -> folder


def _modules():
    """{module name: path} for every .py file of the packages."""
    out = {}
    for name, folder in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                mod = name if rel == "__init__" else f"{name}.{rel[:-len('.__init__')] if rel.endswith('.__init__') else rel}"
                out[mod] = os.path.join(dirpath, f)
    return out


def _resolve(module, level, current, is_package):
    if level == 0:
        return module
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(modules):
    """[(importer, imported module, name or None, line)] for every import of a project module."""
    found = []
    for mod, path in modules.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        found.append((mod, alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node.module, node.level, mod, is_package)
                if not target or target.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from package import module`
                        found.append((mod, sub, None, node.lineno))
                    else:
                        found.append((mod, target, alias.name, node.lineno))
    return found


def _graph(modules, imports):
    edges = {m: set() for m in modules}
    for importer, target, _, _ in imports:
        # importing a.b.c runs a, a.b and a.b.c; a package's own __init__ importing its children is
        # not a cycle back to the package, so only the named module is an edge.
        if target in modules and target != importer:
            edges[importer].add(target)
    return edges


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(edges[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def test_the_checker_finds_a_hidden_cycle_and_a_private_import(tmp_path):
    # the checker itself, on two files: a circle closed by an import inside a function, a private name
    (tmp_path / "x.py").write_text("from autoinit_tf import y\n")
    (tmp_path / "y.py").write_text("def f():\n    from autoinit_tf.x import _helper\n")
    (tmp_path / "z.py").write_text("from . import x\n")
    modules = {f"autoinit_tf.{n}": str(tmp_path / f"{n}.py") for n in "xyz"}
    imports = _imports(modules)
    assert ("autoinit_tf.y", "autoinit_tf.x", "_helper", 2) in imports
    assert ("autoinit_tf.z", "autoinit_tf.x", None, 1) in imports  # relative import resolved
    assert _cycles(_graph(modules, imports)) == [["autoinit_tf.x", "autoinit_tf.y"]]


def test_no_import_cycles():
    modules = _modules()
    assert "autoinit_tf.engine" in modules and "autoinit_tf_cli.convert" in modules
    cycles = _cycles(_graph(modules, _imports(modules)))
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_imported_across_modules():
    modules = _modules()
    bad = []
    for importer, target, name, line in _imports(modules):
        if name is None or not name.startswith("_") or name.startswith("__"):
            continue
        if target == importer:
            continue
        bad.append(f"{modules[importer]}:{line}: from {target} import {name}")
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


@pytest.mark.parametrize("mod", ["autoinit_tf.rules.registry", "autoinit_tf.privacy.state", "autoinit_tf.execute",
                                 "autoinit_tf.graph"])
def test_leaf_modules_stay_leaves(mod):
    """The shared records every layer builds on import no other project module (besides their own leaves)."""
    modules = _modules()
    allowed = {"autoinit_tf.privacy.state": {"autoinit_tf.privacy.ledger", "autoinit_tf.privacy.sampling",
                                             "autoinit_tf.privacy.accounting"},
               "autoinit_tf.execute": {"autoinit_tf.distributions"}}.get(mod, set())
    got = {t for i, t, _, _ in _imports(modules) if i == mod and t in modules}
    assert got <= allowed, got


def test_one_tree_api():
    """keras.tree everywhere (not keras.src.tree or tf.nest outside the TensorFlow-only engines)."""
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        text = open(path, encoding="utf-8").read()
        if "keras.src import tree" in text or "keras.src.tree" in text:
            bad.append(path)
    assert not bad, bad
