"""Two revision folders of the converted SmolLM2 checkpoint, for a `file://.../{revision}` model URI:
v1 as converted (hard links), v2 with its final norm negated, so that greedy answers show which weights
serve.

    python -m e2e.models DIR      # creates DIR/v1 and DIR/v2 (idempotent)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def model_revisions(root: Path) -> str:
    """Creates root/v1 and root/v2 when missing; returns the URI template."""
    from rayprism.engine.loader import resolve_model_path
    from safetensors.torch import load_file, save_file

    if not (root / "v2" / "model.safetensors").exists():
        source = resolve_model_path("builtin://smollm2-135m-instruct")
        shutil.rmtree(root, ignore_errors=True)
        for revision in ("v1", "v2"):
            shutil.copytree(source, root / revision, copy_function=os.link)
        weights = root / "v2" / "model.safetensors"
        tensors = load_file(weights)
        tensors["model.norm.weight"] = -tensors["model.norm.weight"]
        weights.unlink()  # a hard link to v1's file: write a new one
        save_file(tensors, weights, metadata={"format": "pt"})
    return f"file://{root}/{{revision}}"


if __name__ == "__main__":
    print(model_revisions(Path(sys.argv[1]).resolve()))
