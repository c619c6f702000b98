"""The package layout: no two top-level packages import each other, directly or through others; utils/ stays a
leaf (it imports no other part of the project); collectives go through utils/distributed.py alone. Imports are read
with ast from every tracked .py file, including those inside functions."""

import ast
import os
import subprocess
from typing import Dict, List, Set, Tuple

from tests.conftest import REPO


Edge = Tuple[str, str]  # (importing package, imported package)


def python_files() -> List[str]:
    """Tracked .py files (relative paths); every .py file outside hidden folders and .venv when git is missing."""
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules", "wandb", "checkpoints", "data")]
        found += [os.path.relpath(os.path.join(root, f), REPO) for f in files if f.endswith(".py")]
    return found


def top_level_names(files: List[str]) -> Set[str]:
    """Folders at the repository root holding .py files, and the root's own modules (pretrain, puzzle_dataset)."""
    return {f.split("/")[0] if "/" in f else f[:-3] for f in files}


def imported_modules(path: str) -> List[Tuple[str, int]]:
    """(absolute module name, line) of every import in the file; relative imports stay inside their package."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def package_graph() -> Dict[Edge, str]:
    """Each edge between two different top-level names, with the first `file:line` that makes it."""
    files = python_files()
    names = top_level_names(files)
    edges: Dict[Edge, str] = {}
    for path in sorted(files):
        source = path.split("/")[0] if "/" in path else path[:-3]
        for module, line in imported_modules(path):
            target = module.split(".")[0]
            if target in names and target != source:
                edges.setdefault((source, target), f"{path}:{line}")
    return edges


def find_cycle(edges: Dict[Edge, str]) -> List[str]:
    """One cycle [a, b, ..., a] of the graph, or [] when it is acyclic."""
    successors: Dict[str, List[str]] = {}
    for a, b in sorted(edges):
        successors.setdefault(a, []).append(b)
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in successors.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(successors):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycle_between_packages():
    edges = package_graph()
    assert ("pretrain", "training") in edges and ("training", "models") in edges  # the graph was read at all
    cycle = find_cycle(edges)
    assert not cycle, "import cycle " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a} -> {b} at {edges[(a, b)]}" for a, b in zip(cycle, cycle[1:]))


def test_utils_imports_no_other_project_package():
    edges = package_graph()
    assert [f"utils -> {b} at {where}" for (a, b), where in sorted(edges.items()) if a == "utils"] == []


def torch_distributed_uses(path: str) -> List[str]:
    """`file:line` of every import or attribute use of torch.distributed or torch's private torch._utils."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read(), filename=path)
    uses = [line for module, line in imported_modules(path) if module.startswith(("torch.distributed", "torch._utils"))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
                and node.attr in ("distributed", "_utils"):
            uses.append(node.lineno)
    return [f"{path}:{line}" for line in sorted(set(uses))]


def test_only_utils_distributed_uses_torch_distributed():
    # Tests may set up a process group of their own (tests/arc_dist_worker.py); the project's code may not.
    users = [use for path in python_files() if not path.startswith("tests/") and path != "utils/distributed.py"
             for use in torch_distributed_uses(path)]
    assert users == []


def test_find_cycle_reports_a_cycle():
    edges = {("models", "utils"): "models/build.py:7", ("utils", "models"): "utils/checkpoint.py:13",
             ("pretrain", "models"): "pretrain.py:1"}
    assert find_cycle(edges) == ["models", "utils", "models"]
    assert find_cycle({("a", "b"): "", ("b", "c"): "", ("a", "c"): ""}) == []
