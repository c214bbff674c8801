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


def build_parser(with_runtime: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayprism", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = commands.add_parser("render", help="print every object the operator would create for FILE")
    render.add_argument("file", metavar="FILE", help="an InferenceDeployment manifest (YAML)")
    render.add_argument("--default-image", help="worker image for specs without spec.image")
    render.set_defaults(handler=_render)

    crd = commands.add_parser("crd", help="print the InferenceDeployment CustomResourceDefinition")
    crd.set_defaults(handler=_crd)

    if with_runtime:
        from rayprism.local import add_run_arguments
        from rayprism.server.cli import add_serve_arguments

        serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API (the head pod)")
        add_serve_arguments(serve)
        serve.set_defaults(handler=_serve)

        run = commands.add_parser("run", help="serve an InferenceDeployment manifest on this machine")
        add_run_arguments(run)
        run.set_defaults(handler=_run)
    return parser


def _runtime_available() -> bool:
    try:
        import rayprism.local  # noqa: F401
        import rayprism.server.cli  # noqa: F401
    except ImportError:
        return False  # an operator-only install: manifest commands still work
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser(with_runtime=_runtime_available()).parse_args(argv)
    try:
        return args.handler(args)
    except SpecError as e:
        print(f"rayprism {args.command}: invalid InferenceDeployment:\n{e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
