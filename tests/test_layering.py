"""Data flows one way (docs/architecture.md): cli -> workflows -> leaves; maths modules import only torch and stdlib."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dyfcli"
WORKFLOWS = {"train", "forecast", "evaluate", "evaluate_cluster", "export", "sources"}
MATHS = {"noise", "dyffusion", "metrics", "networks"}
MATHS_MAY_IMPORT = {"torch", "dyfcli.noise"}
# metrics scores on the CPU with numpy: np.sort of many short rows (the members of each point) is an order of
# magnitude faster than torch.sort there (issue 11); numpy is still pure maths, without any I/O.
MODULE_MAY_IMPORT = {"metrics": {"numpy"}}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _layer(parts: tuple[str, ...]) -> str:
    if parts[0] in ("cli", "__main__"):
        return "cli"
    if parts[0] in WORKFLOWS:
        return "workflow"
    return "leaf"


def test_leaves_never_import_workflows_or_cli():
    offenders = []
    for path, parts in _modules():
        if _layer(parts) != "leaf":
            continue
        for name in _imports(path):
            segments = name.split(".")
            if segments[0] == "dyfcli" and len(segments) > 1 and (segments[1] in WORKFLOWS or segments[1] == "cli"):
                offenders.append(f"{path.name} imports {name}")
    assert not offenders, offenders


def test_workflows_never_import_cli():
    offenders = [f"{path} imports {name}" for path, parts in _modules() if _layer(parts) == "workflow"
                 for name in _imports(path) if name.startswith("dyfcli.cli")]
    assert not offenders, offenders


def test_maths_modules_import_only_torch_and_stdlib():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    offenders = []
    for path, parts in _modules():
        if len(parts) != 1 or parts[0] not in MATHS:
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            allowed = MATHS_MAY_IMPORT | MODULE_MAY_IMPORT.get(parts[0], set())
            if top in stdlib or any(name == m or name.startswith(m + ".") for m in allowed):
                continue
            if name.startswith("dyfcli.") and name.split(".")[1] in MATHS:
                continue
            offenders.append(f"{path.name} imports {name}")
    assert not offenders, offenders
