"""The layout's rules, read from the source: no import circle (imports inside functions count), no backend module
importing bpy, and the engine never importing the client (Blender's part of the backend)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLENDER_ONLY = {"bpy", "bpy_extras", "mathutils", "bmesh", "gpu", "addon_utils"}


def source_files() -> list:
    """backend/, operators/, panels/ and the extension's root modules."""
    files = sorted(ROOT.glob("*.py"))
    for folder in ("backend", "operators", "panels"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def module_of(path: Path) -> str:
    """'backend/client/pipe', 'operators/jobs', 'catalog'... ('backend/client' for its __init__.py)."""
    rel = path.relative_to(ROOT).with_suffix("")
    return str(rel.parent if rel.name == "__init__" else rel).replace("\\", "/")


def package_of(path: Path) -> str:
    return module_of(path) if path.name == "__init__.py" else str(path.relative_to(ROOT).parent).replace("\\", "/")


def resolve(name: str, known: set) -> str | None:
    name = name.strip("/").replace(".", "/").replace("//", "/")
    if name in ("", "."):
        name = "."
    return name if name in known else None


def imports(path: Path, known: set) -> tuple[set, set]:
    """(modules of this tree that ``path`` imports, top-level names of other packages it imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    inside, outside = set(), set()
    package = package_of(path).split("/") if package_of(path) != "." else []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                outside.add((node.module or "").split(".")[0])
                continue
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = "/".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:  # `from . import x`: x is a module where there is one
                sub = resolve(f"{target}/{alias.name}" if target else alias.name, known)
                if sub:
                    inside.add(sub)
                elif resolve(target or ".", known):
                    inside.add(resolve(target or ".", known))
    return inside, outside


def graph() -> dict:
    files = source_files()
    known = {module_of(f) for f in files}
    return {module_of(f): imports(f, known) for f in files}


def circles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert circles({m: i for m, (i, _) in graph().items()}) == []


def test_the_backend_never_imports_blender():
    offenders = {m: sorted(o & BLENDER_ONLY) for m, (_, o) in graph().items()
                 if m.startswith("backend") and o & BLENDER_ONLY}
    assert offenders == {}


def test_the_engine_never_imports_the_client():
    offenders = {m: sorted(t for t in i if t == "backend/client" or t.startswith("backend/client/"))
                 for m, (i, _) in graph().items()
                 if m.startswith("backend") and not (m == "backend/client" or m.startswith("backend/client/"))}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_client_imports_only_what_blender_can():
    """What Blender imports (the client and what it reaches) needs the standard library and numpy only."""
    edges = graph()
    allowed = {"__future__", "numpy"}
    seen, todo = set(), ["backend/client"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        inside, _ = edges[module]
        todo += [t for t in inside if t.startswith("backend")]
    import sys

    heavy = {m: sorted(o - allowed - set(sys.stdlib_module_names)) for m in seen for o in [edges[m][1]]}
    assert {m: h for m, h in heavy.items() if h} == {}, "imported by Blender, yet needs a package it lacks"


def test_the_rule_finds_circles():
    """The check itself: a circle through an import inside a function is found."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"a"}}) == [["a"]]
    assert circles({"a": {"b"}, "b": set()}) == []
