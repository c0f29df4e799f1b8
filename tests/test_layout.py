"""The package's layering, read from the source with `ast` (nothing is imported): every module opens
with a docstring, titan_rw's modules import each other without circles (module-level and
function-level imports alike), the few explicit layering rules of docs/design.md hold, and no class
is over MAX_CLASS_LINES lines nor any function (method, nested function) over MAX_FUNCTION_LINES."""

import ast
import os

import pytest

from helpers import ROOT

PKG = os.path.join(ROOT, "titan_rw")

# (module, modules it must not import, why). A prefix "x" also forbids "x.<anything>".
RULES = [
    ("titan_rw.trainer", ("titan_rw.config", "titan_rw.train", "titan_rw.cli"),
     "config.py sits above the trainer; the trainer imports nothing above it"),
    ("titan_rw.reweight", ("torch.distributed",), "the paper's math: tensors in, tensors out"),
    ("titan_rw.documents", ("torch.distributed",), "document weights: tensors in, tensors out"),
]


def _modules() -> dict[str, str]:
    """{dotted module name: path} for every .py file of the package (subpackages included)."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


MODULES = _modules()


def _tree(name: str) -> ast.Module:
    with open(MODULES[name]) as fh:
        return ast.parse(fh.read(), MODULES[name])


def imported_names(name: str) -> set[str]:
    """Every module `name` imports anywhere in its body (top level, functions, methods, try/except),
    as dotted names; `from a import b` gives both a and a.b (b may be a module or an attribute)."""
    is_pkg = MODULES[name].endswith("__init__.py")
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..a import b
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def internal_edges(name: str) -> set[str]:
    """The titan_rw modules `name` imports (a name that is an attribute, not a module, maps to its
    module). Importing a.b.c also runs the package a.b's __init__: counted as well."""
    out = set()
    for imp in imported_names(name):
        if not (imp == "titan_rw" or imp.startswith("titan_rw.")):
            continue
        while imp not in MODULES:
            imp = imp.rpartition(".")[0]
        parts = imp.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    out.discard(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (as a path a -> ... -> a), or None: depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_the_package_is_what_these_rules_read():
    for m in ("titan_rw", "titan_rw.trainer", "titan_rw.config", "titan_rw.reweight", "titan_rw.documents",
              "titan_rw.train", "titan_rw.cli", "titan_rw.observability", "titan_rw.faults", "titan_rw.compat"):
        assert m in MODULES, m
    # the reader sees function-level imports and maps attributes to their module
    assert "titan_rw.data.loader" in imported_names("titan_rw.config")  # inside data_loader_available()
    assert {"titan_rw.models", "titan_rw.trainer", "titan_rw.observability"} <= internal_edges("titan_rw.config")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_a_docstring(name):
    tree = _tree(name)
    first = tree.body[0] if tree.body else None
    assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str) and first.value.value.strip()), \
        f"{MODULES[name]}: the module must open with a docstring saying what it is for"


def test_no_import_circles():
    graph = {name: internal_edges(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    """The checker itself: a circle through a function-level import is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


@pytest.mark.parametrize("name,forbidden,why", RULES)
def test_layering_rules(name, forbidden, why):
    imports = imported_names(name)
    bad = sorted(i for i in imports for f in forbidden if i == f or i.startswith(f + "."))
    assert not bad, f"{name} imports {bad}: {why}"


# ---------------------------------------------------------------------------- sizes
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80  # a method or a nested function counts on its own (and inside its parent)

# The known exceptions, being brought under the limits by the observability rework (issue 25). The
# lead empties this list at that merge; the test fails on an entry that is no longer needed.
# (module, qualified name or None for any class/function of the module or its subpackage)
SIZE_EXCEPTIONS_UNTIL_OBSERVABILITY_REWORK = [
]


def definition_sizes(tree: ast.Module) -> list[tuple[str, str, int]]:
    """(qualified name, "class" or "function", lines from its `def`/`class` line to its last line)
    of every class and function of a module, nested ones included."""
    out = []

    def walk(node, prefix):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + n.name
                out.append((name, "class" if isinstance(n, ast.ClassDef) else "function", n.end_lineno - n.lineno + 1))
                walk(n, name + ".")
            else:
                walk(n, prefix)

    walk(tree, "")
    return out


def oversized() -> list[tuple[str, str, str, int]]:
    """(module, qualified name, kind, lines) of every class and function over its limit."""
    limit = {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
    return [(m, q, kind, n) for m in sorted(MODULES) for q, kind, n in definition_sizes(_tree(m)) if n > limit[kind]]


def _excepted(module: str, qualname: str, entry) -> bool:
    mod, name = entry
    if not (module == mod or module.startswith(mod + ".")):
        return False
    return name is None or qualname == name or qualname.startswith(name + ".")


def test_definition_sizes_reader():
    """The measure itself, on a made-up module: a class's lines run from `class` to its last line,
    a method counts on its own, a nested function too."""
    src = "class A:\n    def f(self):\n        def g():\n            return 1\n        return g\n\n\ndef h():\n    pass\n"
    assert definition_sizes(ast.parse(src)) == [("A", "class", 5), ("A.f", "function", 4), ("A.f.g", "function", 2),
                                                  ("h", "function", 2)]
    assert _excepted("titan_rw.observability.sinks", "RunLogger.record", ("titan_rw.observability", None))
    assert not _excepted("titan_rw.trainer", "_check_parallelism", ("titan_rw.trainer", "ReweightTrainer"))


def test_no_class_over_300_lines_and_no_function_over_80():
    big = oversized()
    bad = [b for b in big if not any(_excepted(b[0], b[1], e) for e in SIZE_EXCEPTIONS_UNTIL_OBSERVABILITY_REWORK)]
    assert not bad, "over the size limits (split them): " + "; ".join(
        f"{m}.{q} ({kind}, {n} lines)" for m, q, kind, n in bad)
    stale = [e for e in SIZE_EXCEPTIONS_UNTIL_OBSERVABILITY_REWORK
             if not any(_excepted(m, q, e) for m, q, _, _ in big)]
    assert not stale, f"no longer over the limits: remove {stale} from SIZE_EXCEPTIONS_UNTIL_OBSERVABILITY_REWORK"
