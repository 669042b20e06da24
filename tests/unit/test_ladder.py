"""The house's ladder: imports point one way, down the list of subpackages.

Every ``import`` and ``from ... import`` in casa_kernel/ counts: at module level,
inside functions, and under ``if TYPE_CHECKING:`` (a type named from above is
still knowledge of the room above; move the type down instead). Imports by
string (``importlib.import_module`` of the lazy names in casa_kernel/__init__.py,
casampi/bridge.py and preflight/__init__.py) are not seen; each of those stays
inside its own room or is the package's own entry.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "casa_kernel"

#: Top to bottom: a module may import its own subpackage and any below it.
LADDER = ("cli", "kernel", "casampi", "client", "cluster", "preflight", "config", "server", "casa")
#: Used by all, importing nothing of casa_kernel.
ROOT = ("errors", "display", "variables")
#: The package's own entry points: __init__ (public API, lazy) and __main__ (the kernel).
ENTRY = ("__init__", "__main__")
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "resources" not in p.parts)


def _room(path: Path) -> str:
    """'cluster', 'errors' (root), '__init__' (entry) ... for a module path."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.AST, path: Path) -> list[str]:
    """The casa_kernel modules (or package attributes) an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = _dotted(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    # `from casa_kernel import config` names the module casa_kernel.config
    return [f"{base}.{a.name}" if base == "casa_kernel" else base for a in node.names]


def _arrow(source: str, target: str) -> str | None:
    """Why ``source`` (a room) may not import ``target`` (a dotted name); None if it may."""
    parts = target.split(".")
    if parts[0] != "casa_kernel":
        return None
    if source in ENTRY:
        return None
    into = parts[1] if len(parts) > 1 else ""
    if source in ROOT:
        return f"root module {source} imports {target}"
    if into == "__version__" or into in ROOT:
        return None
    if into not in LADDER:
        return f"{source} imports {target}, which is no room of the ladder"
    if LADDER.index(into) < LADDER.index(source):
        return f"{source} -> {into} points up ({target})"
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, target)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for target in _targets(node, path)
    ]


def test_every_module_lives_in_a_room() -> None:
    for path in _modules():
        room = _room(path)
        assert room in LADDER or room in ROOT or room in ENTRY, f"{path}: not in the ladder"


def test_no_import_points_up() -> None:
    problems = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {why}"
        for path in _modules()
        for line, target in _imports(path)
        if (why := _arrow(_room(path), target))
    ]
    assert not problems, "imports against the ladder:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source, target, allowed",
    [
        ("cluster", "casa_kernel.config.settings", True),
        ("cluster", "casa_kernel.cluster.state", True),
        ("cluster", "casa_kernel.kernel.magics", False),
        ("casa", "casa_kernel.casampi.bridge", False),
        ("server", "casa_kernel.client.dispatch", False),
        ("server", "casa_kernel.errors", True),
        ("preflight", "casa_kernel.__version__", True),
        ("display", "casa_kernel.errors", False),
        ("variables", "casa_kernel.__version__", False),
        ("config", "ipyparallel", True),
    ],
)
def test_the_rule_itself(source: str, target: str, allowed: bool) -> None:
    assert (_arrow(source, target) is None) is allowed


def test_function_level_and_type_checking_imports_are_seen(tmp_path: Path) -> None:
    module = PACKAGE / "server" / "engine.py"
    found = dict((t, n) for n, t in _imports(module))
    # engine.py imports casa/ inside functions only
    assert "casa_kernel.casa.tasks" in found
    servers = {t for _, t in _imports(PACKAGE / "cluster" / "servers.py")}
    assert "casa_kernel.cluster.lifecycle" in servers  # under TYPE_CHECKING


def test_no_module_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_environment_variables_are_spelled_in_variables_py_only() -> None:
    # resources/casasiteconfig.py is exempt: CASA executes it as a file of its own
    # (CASASITECONFIG), where casa_kernel cannot be imported.
    prefix = "CASA_KERNEL" + "_"
    spelled = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in _modules()
        if path.name != "variables.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if prefix in line
    ]
    assert not spelled, "spell variables through casa_kernel.variables:\n" + "\n".join(spelled)


def test_variables_table_matches_the_constants() -> None:
    from casa_kernel import variables
    from casa_kernel.config.settings import DEFAULT_START_TIMEOUT
    from casa_kernel.preflight.judge import DEFAULT_TIMEOUT

    constants = {
        value
        for name, value in vars(variables).items()
        if re.fullmatch(r"[A-Z_]+", name) and isinstance(value, str)
    }
    names = [v.name for v in variables.VARIABLES]
    assert len(names) == len(set(names))
    assert set(names) == constants
    assert all(v.meaning and not v.meaning.endswith(".") for v in variables.VARIABLES)
    defaults = {v.name: v.default for v in variables.VARIABLES}
    assert float(defaults[variables.START_TIMEOUT]) == DEFAULT_START_TIMEOUT
    assert float(defaults[variables.PREFLIGHT_TIMEOUT]) == DEFAULT_TIMEOUT


def test_a_server_imports_nothing_of_the_kernels_machinery() -> None:
    """ipyparallel's canning imports a shipped function's module on the server."""
    code = (
        "import json, sys\n"
        "import casa_kernel.server.engine, casa_kernel.server.cube, casa_kernel.server.output\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    forbidden = (
        "ipyparallel.client",
        "ipyparallel.cluster",
        "casa_kernel.cluster",
        "casa_kernel.client",
        "casa_kernel.casampi",
        "casa_kernel.kernel",
        "casa_kernel.preflight",
        "casa_kernel.config",
    )
    bad = [m for m in loaded if m.startswith(forbidden)]
    assert not bad, f"a server loads {bad}"
