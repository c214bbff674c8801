"""What local clusters running at the same time on one machine (two test sessions) share, under file locks:
the choice of a free subnet, and the mountpoint dirs created on the machine for the pods' volumes, which
only the last local cluster to stop removes (removing one that another's pod mounts on would detach it).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

STATE = Path("/run/rayprism-kubelet")


@contextlib.contextmanager
def setup_lock():
    """Held while a subnet is chosen or mountpoints are created."""
    STATE.mkdir(exist_ok=True)
    with open(STATE / "setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Mountpoints:
    """Every running local cluster holds nodes.lock shared; the last one out (its exclusive try
    succeeds) removes the dirs any of them created, as recorded in the `mountpoints` file."""

    def __enter__(self) -> "Mountpoints":
        STATE.mkdir(exist_ok=True)
        self._alive = open(STATE / "nodes.lock", "a")
        fcntl.flock(self._alive, fcntl.LOCK_SH)
        return self

    def ensure(self, target: str) -> None:
        """Creates `target` and its missing parents, and records them."""
        with setup_lock():
            path = Path(target)
            missing = [p for p in [path, *path.parents] if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
            with open(STATE / "mountpoints", "a") as record:
                record.writelines(f"{p}\n" for p in missing)

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self._alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._alive.close()  # another local cluster runs: it removes them
        record = STATE / "mountpoints"
        created = set(record.read_text().split()) if record.exists() else set()
        for path in sorted(map(Path, created), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # gone, or not empty: not ours to empty
                path.rmdir()
        record.unlink(missing_ok=True)
        self._alive.close()
