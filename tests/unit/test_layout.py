"""The code stays small enough to read: no module in gradsparse/ or comm/ over 350 lines,
no function over 60, and every public module declares ``__all__``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# gradsparse/comm links to comm/: take comm/ once, from the top level
MODULES = sorted(
    [p for p in (ROOT / "gradsparse").rglob("*.py") if p.relative_to(ROOT / "gradsparse").parts[0] != "comm"]
    + list((ROOT / "comm").glob("*.py"))
)
IDS = [str(p.relative_to(ROOT)) for p in MODULES]


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_module_and_function_sizes(path):
    source = path.read_text()
    assert source.count("\n") <= 350, f"{path.name} has {source.count(chr(10))} lines (at most 350)"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"functions over 60 lines in {path.name}: {long}"


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_public_modules_declare_all(path):
    if path.name.startswith("_") and path.name not in ("__init__.py",):
        return  # private modules (and __main__) need no __all__
    tree = ast.parse(path.read_text())
    targets = [t for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    targets += [node.target for node in tree.body if isinstance(node, ast.AnnAssign)]
    names = {t.id for t in targets if isinstance(t, ast.Name)}
    assert "__all__" in names, f"{path.relative_to(ROOT)} has no __all__"


def test_comm_imports_nothing_private_from_gradsparse():
    for path in (ROOT / "comm").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradsparse"):
                assert not any(part.startswith("_") for part in node.module.split(".")), (path.name, node.module)
                assert not node.module.startswith(
                    ("gradsparse.ddp", "gradsparse.engine", "gradsparse.integrations.horovod")
                ), (
                    path.name,
                    node.module,
                )


def test_comm_modules_share_helpers_only_through_common():
    for path in (ROOT / "comm").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module != "_common":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from .{node.module}"


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_no_class_over_150_lines(path):
    big = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 150
    ]
    assert not big, f"classes over 150 lines in {path.name}: {big}"


def test_no_two_modules_share_a_name():
    """One name per concept: a module's file name says which one (packages' __init__ and
    __main__ aside)."""
    seen: dict = {}
    for path in MODULES:
        if path.name in ("__init__.py", "__main__.py"):
            continue
        seen.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    shared = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not shared, shared
