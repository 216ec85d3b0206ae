"""The layout the architecture promises (ARCHITECTURE.md): no import circle among earwitness/, serving/, train/ and
models/ (function-level imports included), no private name imported from another module; models/ imports neither
serving/ nor train/, serving/ never imports train/, train/ imports serving/ only for the evaluation engine, and only
earwitness/ (the command line) imports both; few function-level imports of project modules, each with its reason; no
call runs back up (nothing below the edge imports it, no callable handed down, no write to another object's private
state); the guard calls the verifier through its typed client only and judges in one place."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("earwitness", "serving", "train", "models")
PRODUCT = ("serving", "train", "models")
MAX_FUNCTION_LEVEL_IMPORTS = 40
# the HTTP edge: what a request enters first; nothing it calls may import it back
EDGE = {"serving.ingress", "serving.openai_api", "serving.verify_api", "serving.middleware", "serving.intake", "serving.proxy", "serving.runtime",
        "serving.app", "serving.cli", "serving.schemas"}


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
           or (m.startswith("train") and d.startswith("serving") and not d.startswith("serving.backends"))
           or (not m.startswith("earwitness") and d.startswith("earwitness"))]
    assert not bad, bad


def test_no_private_name_crosses_modules():
    mods = _modules()
    crossings = [(m, module, n) for m, path in mods.items() for module, names in _imports(m, path)
                 if module.split(".")[0] in PACKAGES for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossings


def _function_level_imports() -> list[tuple[str, int, bool]]:
    """``(file, line, has a reason)`` for every import of a project module inside a function of product code. The
    reason is a comment on the import's line, or on the line above its group of imports."""
    out = []
    for pkg in PRODUCT:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            lines = f.read_text().split("\n")

            def visit(node, in_function: bool) -> None:
                for child in ast.iter_child_nodes(node):
                    inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                    if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                        mods = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                        if child.__class__ is ast.ImportFrom and child.level or any(m.split(".")[0] in PACKAGES for m in mods):
                            out.append((str(f.relative_to(ROOT)), child.lineno, _has_reason(lines, child.lineno - 1)))
                    visit(child, inside)

            visit(ast.parse("\n".join(lines)), False)
    return out


def _has_reason(lines: list[str], i: int) -> bool:
    if "#" in lines[i]:
        return True
    j = i - 1
    while j >= 0 and (not lines[j].strip() or lines[j].lstrip().startswith(("import ", "from "))):
        j -= 1
    return j >= 0 and lines[j].lstrip().startswith("#")


def test_few_function_level_imports_each_with_its_reason():
    """A module's dependencies show at its top; an import inside a function is the exception (a heavy or optional
    part loaded only where it is used), and says why."""
    found = _function_level_imports()
    assert len(found) <= MAX_FUNCTION_LEVEL_IMPORTS, f"{len(found)} function-level imports of project modules"
    assert not [(f, n) for f, n, why in found if not why], "function-level imports without a reason comment"


def test_the_reason_finder_reads_a_group_comment():
    lines = ["def f():", "    # function-level: heavy", "    from a import b", "", "    from c import d", "    x = 1", "    from e import f"]
    assert _has_reason(lines, 2) and _has_reason(lines, 4) and not _has_reason(lines, 6)


def test_nothing_below_the_edge_imports_it():
    """Calls run down from the HTTP edge: the guard, the deployments, the engines and models/ never import it."""
    bad = [(m, d) for m, deps in _graph().items() for d in deps if d in EDGE and m not in EDGE and not m.startswith("earwitness")]
    assert not bad, bad


def _product_trees():
    for pkg in PRODUCT:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            yield f.relative_to(ROOT), ast.parse(f.read_text())


def test_no_callable_is_handed_down_to_the_guard():
    """The guard is given the model's answer, never a function that calls back into the edge."""
    hits = []
    for f, tree in _product_trees():
        if f.parts[:2] != ("serving", "guard"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in [*node.args.args, *node.args.kwonlyargs]:
                    if a.annotation is not None and "Callable" in ast.unparse(a.annotation):
                        hits.append((str(f), node.name, a.arg))
    assert not hits, hits


def test_no_write_to_another_objects_private_state():
    """``x._name = ...``, ``setattr(x, "_name", ...)`` and ``hasattr``/``getattr`` of a private name are an object's
    own business (``self``/``cls``) only: state belongs to the object that holds it."""
    hits = []
    for f, tree in _product_trees():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and _private(sub.attr)
                            and not (isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"))):
                        hits.append((str(f), sub.lineno, ast.unparse(sub)))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                    and _private(node.args[1].value) and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
                hits.append((str(f), node.lineno, ast.unparse(node)))
    assert not hits, hits


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_guard_calls_the_verifier_through_its_typed_client_and_judges_in_one_place():
    """Deployment calls by name (``handle.method.remote``) live in the typed client alone, and ``judge`` is called
    in the runner alone: one verifier interface, one judgement per claim."""
    remote, judging = [], []
    for f, tree in _product_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "remote" and f.parts[:2] == ("serving", "guard") and f.name != "client.py":
                    remote.append((str(f), node.lineno))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "judge":
                judging.append(str(f))
    assert not remote, remote
    assert set(judging) == {"serving/guard/runner.py"}, judging


def test_train_reads_data_then_stages_then_evaluation():
    """Reports and diagnostics sit on top: nothing in train/ imports the probe report but the command that runs it
    (``train.commands``), and the lookup stage (``train.lookup``) never imports the binding diagnostic built on it."""
    graph = _graph()
    report = sorted(m for m, deps in graph.items() if "train.probe" in deps and m != "train.commands")
    assert not report, report
    assert "train.binding" not in graph["train.lookup"]
    assert "train.lookup" in graph["train.binding"] and "train.lookup" in graph["train.small_recipe"]
