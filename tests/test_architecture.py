"""The package's import graph, read from the source with ``ast`` (imports inside functions
included, since they run too): no import cycle inside ``stm_live``, and no private name of
one of its modules used by another (imported, or read as ``module._name``)."""

from __future__ import annotations

import ast
from pathlib import Path

import stm_live


def _modules(root, package):
    """Every module under ``root`` by dotted name; a package's ``__init__`` is the package."""
    modules = {}
    for path in sorted(Path(root).rglob("*.py")):
        parts = (package,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _tree(modules, name):
    return ast.parse(modules[name].read_text(), filename=str(modules[name]))


def _imports(modules, name):
    """(target module, imported name or None, line, (local name, module) it binds or None)
    for each import in module ``name`` that lands on one of ``modules``. ``from pkg import
    mod`` lands on ``pkg.mod`` and on ``pkg``: it looks ``mod`` up on the package first
    (running a module ``__getattr__`` there)."""
    found = []
    for node in ast.walk(_tree(modules, name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    head = alias.name.split(".")[0]  # `import a.b` binds a, `import a.b as m` binds m
                    bound = (alias.asname, alias.name) if alias.asname else (head, head)
                    found.append((alias.name, None, node.lineno, bound))
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                # Relative to the package the module is in (or is, for an __init__).
                anchor = name.split(".")[: None if modules[name].name == "__init__.py" else -1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, None, node.lineno, (alias.asname or alias.name, submodule)))
                if base in modules:
                    imported = None if submodule in modules else alias.name
                    found.append((base, imported, node.lineno, None))
    return sorted(found, key=lambda hit: hit[2])


def _graph(modules):
    return {name: sorted({hit[0] for hit in _imports(modules, name)} - {name}) for name in modules}


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(graph[root]))]
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _one_loop(graph, component):
    """A shortest loop from the component's first module back to it, for the message."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in graph[path[-1]]:
            if nxt == start:
                return path + [start]
            if nxt in members and nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return component


def _private(attribute):
    return attribute.startswith("_") and not attribute.startswith("__")


def _dotted(node):
    """ "a.b.c" for an attribute chain of plain names, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _private_uses(modules):
    """Each private name of a module that another module imports, or reads off it."""
    found = []
    for name in modules:
        hits = _imports(modules, name)
        found += [
            f"{name} (line {line}) imports {imported} from {target}"
            for target, imported, line, _ in hits
            if imported and _private(imported)
        ]
        bound = dict(hit[3] for hit in hits if hit[3])
        reads = []
        for node in ast.walk(_tree(modules, name)):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            head, _, rest = (_dotted(node.value) or "").partition(".")
            owner = ".".join(filter(None, (bound.get(head), rest)))
            if head in bound and owner in modules and owner != name:
                reads.append((node.lineno, f"{name} (line {node.lineno}) reads {node.attr} off {owner}"))
        found += [text for _, text in sorted(reads)]
    return found


PACKAGE = _modules(Path(stm_live.__file__).resolve().parent, "stm_live")


def test_the_reader_finds_every_kind_of_import(tmp_path):
    # A made-up package, so that the checks below cannot pass by reading nothing.
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.sub import b\n",  # inside a function
        "sub/__init__.py": "def __getattr__(name):\n    from .b import thing\n",  # lazy
        "sub/b.py": "from .. import c\nfrom ..d import _hidden\n",  # relative, up one
        "c.py": "import pkg.a\n",  # closes a -> sub.b -> c -> a
        "d.py": "import os\nimport pkg\nimport pkg.e as m\nm._x, pkg.e._y, m.f._z, os._exit\n",
        "e.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = _modules(tmp_path, "pkg")
    graph = _graph(modules)
    assert graph == {
        "pkg": [],
        "pkg.a": ["pkg.sub", "pkg.sub.b"],
        "pkg.c": ["pkg.a"],
        "pkg.d": ["pkg", "pkg.e"],
        "pkg.e": [],
        "pkg.sub": ["pkg.sub.b"],
        "pkg.sub.b": ["pkg", "pkg.c", "pkg.d"],
    }
    assert _cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub", "pkg.sub.b"]]
    assert _one_loop(graph, _cycles(graph)[0]) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert _private_uses(modules) == [
        "pkg.d (line 4) reads _x off pkg.e",
        "pkg.d (line 4) reads _y off pkg.e",
        "pkg.sub.b (line 2) imports _hidden from pkg.d",
    ]
    assert len(PACKAGE) > 40 and "stm_live.devices" in PACKAGE


def test_no_import_cycle_inside_the_package():
    graph = _graph(PACKAGE)
    cycles = _cycles(graph)
    assert not cycles, "import cycles (the modules of each; one loop through them):\n" + "\n".join(
        f"{', '.join(c)}: {' -> '.join(_one_loop(graph, c))}" for c in cycles
    )


def test_no_private_name_of_another_module_is_used():
    found = _private_uses(PACKAGE)
    assert not found, "private names used from another module:\n" + "\n".join(found)
