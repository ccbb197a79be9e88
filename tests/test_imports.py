"""The package's import structure: floors, each module importing only from its own floor or below, and no circle.

Imports inside functions count (they are still dependencies); imports under ``if TYPE_CHECKING:`` do not.
A new module must be given a floor here."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module's floor is that of its longest matching prefix
FLOORS = {
    # 0: no project imports of substance: errors, metrics, QA post-processing, the lexical MT model, adapter stacking
    "flare": 0, "flare.errors": 0, "flare.metrics": 0, "flare.qa": 0, "flare.lexical_mt": 0,
    "flare.models": 0, "flare.models.stack": 0, "flare.models.inspect": 0,
    # 1: the tables (models, tasks, languages), files and prompts
    "flare.config": 1, "flare.languages": 1, "flare.files": 1, "flare.prompts": 1,
    # 2: data and the shared flags
    "flare.data": 2, "flare.common_args": 2,
    # 3: models (loading, the embedded model's converter, fusion, X-Mixup) and evaluation
    "flare.models.embedded": 3, "flare.models.loading": 3, "flare.models.fusion": 3, "flare.evaluation": 3,
    "flare.models.xmixup": 3,
    # 4: training and the jobs built on it
    "flare.trainer": 4, "flare.stages": 4, "flare.translate": 4, "flare.report": 4, "flare.tiny_models": 4,
    # 5: the two stages, the MT-quality curve and the crossed evaluations built on the report; 6: the sweep
    "flare.stage1": 5, "flare.stage2": 5, "flare.curve": 5, "flare.crossed": 5, "flare.sweep": 6,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "flare").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def floor(module: str) -> int:
    prefixes = [p for p in FLOORS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no floor: add it to FLOORS in tests/test_imports.py"
    return FLOORS[max(prefixes, key=len)]


def imports(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flare":
            for alias in node.names:  # `from flare.models import embedded` imports the module flare.models.embedded
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "flare"}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_every_import_goes_to_the_same_floor_or_below():
    g = graph()
    upward = [f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})" for m, deps in g.items() for d in deps
              if floor(d) > floor(m)]
    assert not upward, "\n".join(upward)
    # the tables do not know the converter of the embedded model (the loading code resolves it)
    assert "flare.models.embedded" not in g["flare.config"]


def find_circle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``g`` as a path (first = last), or None."""
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            return on_path[on_path.index(m):] + [m]
        if m in done:
            return None
        on_path.append(m)
        for d in sorted(g.get(m, ())):
            if circle := visit(d):
                return circle
        on_path.pop()
        done.add(m)
        return None

    return next((c for m in sorted(g) if (c := visit(m))), None)


def test_no_import_circle():
    circle = find_circle(graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checks_are_not_vacuous():
    """The graph has the edges the code has (lazy imports too), and a circle is found where there is one."""
    g = graph()
    assert "flare.models.fusion" in g["flare.stage2"] and "flare.errors" in g["flare.models.fusion"]
    assert "flare.models.embedded" in g["flare.models.loading"]  # an import inside a function counts
    assert floor("flare.data.nusax") == 2 and floor("flare.models.fusion") == 3
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
