"""The layout the architecture promises (ARCHITECTURE.md): no import circle among serving/, train/ and models/
(function-level imports included), no private name imported from another module, and models/ imports neither
serving/ nor train/, serving/ never imports train/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "train", "models")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in the file, at any depth (relative ones resolved)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")[: len(name.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            out.append((module, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for module, names in _imports(m, path):
            if module.split(".")[0] not in PACKAGES:
                continue
            for target in [module, *(f"{module}.{n}" for n in names)]:
                dep = owner(target)
                if dep and dep != m and not m.startswith(dep + "."):  # a package's own __init__ is not a circle
                    graph[m].add(dep)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles():
    assert not _circles(_graph())


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_rooms_import_only_what_they_may():
    """models/ owns architectures and parts: it imports neither serving/ nor train/; serving/ never imports train/ (the
    command line that joins them is ``earwitness/cli.py``, above both); train/ imports serving/ only for the evaluation
    engine (``serving.backends``)."""
    bad = [(m, d) for m, deps in _graph().items() for d in deps
           if (m.startswith("models") and d.split(".")[0] in ("serving", "train"))
           or (m.startswith("serving") and d.startswith("train"))
           or (m.startswith("train") and d.startswith("serving") and not d.startswith("serving.backends"))]
    assert not bad, bad


def test_no_private_name_crosses_modules():
    mods = _modules()
    crossings = [(m, module, n) for m, path in mods.items() for module, names in _imports(m, path)
                 if module.split(".")[0] in PACKAGES for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossings
