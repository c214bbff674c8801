"""`rayprism-operator`: kopf's `run` command with the rayprism handlers loaded.

Every kopf flag works as documented by kopf: -A/--all-namespaces, -n NS, --standalone, --liveness URL,
--verbose, --peering NAME, --priority N. Credentials come from KUBECONFIG or the in-cluster service
account. Operator-wide settings come from the environment: RAYPRISM_DEFAULT_WORKER_IMAGE.
"""

from __future__ import annotations

import sys

from kopf import cli


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    cli.run.main(args=["-m", "rayprism_operator.handlers", *args], prog_name="rayprism-operator")


if __name__ == "__main__":
    main()
