"""No import cycle inside fusedtie: every import of a fusedtie module, at module level or inside a
function, relative or absolute, is an edge of one graph, and the graph must be acyclic. (A cycle
hidden in a function body works until the day the import order changes; this catches it now.)

Read from the source with ``ast``, nothing is imported: ``import fusedtie.x`` is an edge to
fusedtie.x and, since it binds the name ``fusedtie``, to the package itself (``import fusedtie.x as
y`` only to fusedtie.x); ``from . import x`` and ``from fusedtie import x`` are an edge to the
submodule x where there is one, else to the package; ``importlib.import_module("fusedtie.x")`` with
a literal name counts too. The packages that an import runs on the way to a submodule (the
fusedtie/__init__.py of ``from .ops import x``) are not edges: they are already being imported
when one of their modules runs."""

import ast
import pathlib
import textwrap
from typing import Optional

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "fusedtie"


def package_modules(package_dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """Every module of the package (subpackages included): dotted name -> (path, is a package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _resolve_from(name: str, is_package: bool, level: int, module: Optional[str]) -> str:
    """The absolute module a ``from`` import names (``from ..a import b`` in p.q.r gives p.a)."""
    if level == 0:
        return module or ""
    base = name.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def import_edges(name: str, path: pathlib.Path, is_package: bool, modules) -> set[str]:
    """The modules of ``modules`` that the module ``name`` imports, wherever in it the import is."""
    top = name.split(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(alias.name)
                if alias.asname is None:  # binds the top-level package
                    targets.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(name, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            literal = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(literal, str):
                targets.add(literal)
    return {t for t in targets if t in modules and t.split(".")[0] == top and t != name}


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    modules = package_modules(package_dir)
    return {name: import_edges(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_fusedtie_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert "fusedtie.ops" in graph and "fusedtie" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in fusedtie: " + " -> ".join(cycle)


def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_a_cycle_through_function_bodies_and_subpackages_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n",
            "pkg/a.py": """
                def f():
                    from .sub import c  # inside a function, still an edge
                    return c
            """,
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "import importlib\nB = importlib.import_module('pkg.b')\n",
            "pkg/b.py": "def g():\n    import pkg.a as a\n    return a\n",
        },
    )
    cycle = find_cycle(import_graph(package))
    assert cycle is not None
    assert cycle[0] == cycle[-1] and {"pkg.a", "pkg.sub.c", "pkg.b"} <= set(cycle)


def test_importing_the_package_from_inside_is_a_cycle(tmp_path):
    package = write_package(
        tmp_path,
        {"pkg/__init__.py": "from .a import f\n", "pkg/a.py": "def f():\n    import pkg\n    return pkg\n"},
    )
    assert find_cycle(import_graph(package)) == ["pkg", "pkg.a", "pkg"]


def test_from_dot_import_names_the_submodule_not_the_package(tmp_path):
    # Were `from . import b` taken as an import of pkg itself, pkg -> pkg.a -> pkg would be a cycle.
    package = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from . import a\nVERSION = 1\n",
            "pkg/a.py": "from . import b\nfrom .sub.c import C\n",
            "pkg/b.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from .. import b\nC = 1\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.b"}
    assert find_cycle(graph) is None
