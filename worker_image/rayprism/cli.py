"""The `rayprism` command: render and inspect manifests, serve a model, run a manifest locally."""

from __future__ import annotations

import argparse
import sys

from rayprism_operator.api import SpecError, load_inference_deployment

EXIT_BAD_INPUT = 2


def _render(args: argparse.Namespace) -> int:
    import yaml

    from rayprism_operator.render import RenderOptions, render_all

    infd = load_inference_deployment(args.file)
    options = RenderOptions(default_image=args.default_image) if args.default_image else RenderOptions()
    sys.stdout.write(yaml.safe_dump_all(render_all(infd, options), sort_keys=False))
    return 0


def _crd(args: argparse.Namespace) -> int:
    from rayprism_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rayprism.server.cli import serve

    return serve(args)


def _run(args: argparse.Namespace) -> int:
    from rayprism.local import run

    return run(args)


RUNTIME_COMMANDS = {
    "serve": "serve a model over an OpenAI-compatible API (what the head pod runs)",
    "run": "serve an InferenceDeployment manifest on this machine",
}


def build_parser(runtime_command: str | None = None) -> argparse.ArgumentParser:
    """The runtime commands' flags are only built when one of them runs: they import torch and Ray."""
    parser = argparse.ArgumentParser(prog="rayprism", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = commands.add_parser("render", help="print every object the operator would create for FILE")
    render.add_argument("file", metavar="FILE", help="an InferenceDeployment manifest (YAML)")
    render.add_argument("--default-image", help="worker image for specs without spec.image")
    render.set_defaults(handler=_render)

    crd = commands.add_parser("crd", help="print the InferenceDeployment CustomResourceDefinition")
    crd.set_defaults(handler=_crd)

    for name, help_text in RUNTIME_COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == runtime_command == "serve":
            from rayprism.server.cli import add_serve_arguments

            add_serve_arguments(sub)
            sub.set_defaults(handler=_serve)
        elif name == runtime_command == "run":
            from rayprism.local import add_run_arguments

            add_run_arguments(sub)
            sub.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    runtime_command = command if command in RUNTIME_COMMANDS else None
    try:
        parser = build_parser(runtime_command)
    except ImportError as e:
        print(f"rayprism {command}: the worker runtime is not installed ({e}); "
              "install rayprism[worker]", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as e:
        print(f"rayprism {args.command}: invalid InferenceDeployment:\n{e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
