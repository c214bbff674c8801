"""pyproject.toml declares what the code imports: each image installs one extra, so a package that is only
there by accident (another extra, or a dependency of a dependency) breaks that image and nothing else."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest

from .conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"rayprism", "rayprism_operator", "tests", "e2e"}
# Imported, deliberately not declared for the worker: torch's CUDA wheels depend on the matching triton (the
# worker image's base image has it); the engine imports it only on CUDA paths. (The dev extra declares it, for the
# kernels' CPU tests under Triton's interpreter.)
COMES_WITH_CUDA_TORCH = {"triton"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _declared(*extras: str) -> set[str]:
    requirements = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return {_name(r) for r in requirements}


def _imports(folder: str) -> dict[str, str]:
    """Third-party top-level modules imported anywhere under folder -> a file importing it."""
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top not in sys.stdlib_module_names | FIRST_PARTY | COMES_WITH_CUDA_TORCH | {"__future__"}:
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("folder,extras", [
    ("operator/rayprism_operator", ("operator",)),          # operator/Dockerfile: "/src[operator]"
    ("worker_image/rayprism", ("worker",)),                 # worker_image/Dockerfile: "/src[worker]"
    ("tests", ("operator", "worker", "dev")),               # make install: ".[operator,worker,dev]"
])
def test_every_import_is_declared(folder, extras):
    distributions = packages_distributions()
    declared = _declared(*extras)
    missing = {module: where for module, where in _imports(folder).items()
               if not declared & {_name(d) for d in distributions.get(module, [module])}}
    assert not missing, f"imported but not in {extras} of pyproject.toml: {missing}"


def test_operator_extra_stays_free_of_torch_and_ray():
    assert not {"torch", "ray", "transformers"} & _declared("operator")
