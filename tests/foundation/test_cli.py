"""`rayprism render` and `rayprism crd`: output, and bad input as exit 2 with one clear message."""

import subprocess
import sys

import pytest
import yaml

from .conftest import EXAMPLES


def _rayprism(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayprism.cli", *args], capture_output=True, text=True, timeout=120)


def test_render_prints_every_object():
    result = _rayprism("render", str(EXAMPLES / "llama.yaml"))
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["Secret", "Service", *["NetworkPolicy"] * 3, "RayCluster", "RayCluster"]


def test_crd_prints_the_crd():
    result = _rayprism("crd")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["metadata"]["name"] == "inferencedeployments.rayprism.dev"


@pytest.mark.parametrize("content,message", [
    ("spec: [unclosed", "not valid YAML"),
    ("just a string", "<root>: expected a mapping"),
    ("apiVersion: rayprism.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: a}\n"
     "spec: {model: {name: m, uri: 'hf://o/m'}, replica: 2}", "spec.replica: unknown field"),
    ("apiVersion: rayprism.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: a}\n"
     "spec: {model: {name: m, uri: 'hf://o/m'}, replicas: many}", "spec.replicas: Input should be a valid integer"),
    ("apiVersion: rayprism.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: a}\n"
     "spec: {model: {name: m, uri: 'hf://o/m'}, parallelism: {tensor: 16}}", "parallelism must fit"),
    ("apiVersion: rayprism.dev/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: a}\n"
     "spec: {model: {name: m, uri: 'ftp://o/m'}}", "spec.model: model.uri must use a supported scheme"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, content, message):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(content)
    result = _rayprism("render", str(manifest))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_file_exits_2(tmp_path):
    result = _rayprism("render", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_operator_and_manifest_commands_import_without_torch_or_ray():
    """The operator image installs neither; the manifest commands must not need them either."""
    code = (
        "import importlib, pkgutil, sys, io, contextlib\n"
        "import rayprism_operator\n"
        "for m in pkgutil.iter_modules(rayprism_operator.__path__):\n"
        "    importlib.import_module('rayprism_operator.' + m.name)\n"
        "from rayprism.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['render', '{EXAMPLES / 'llama.yaml'}']) == 0 and main(['crd']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
