"""``optiserve`` command line. Flags are generated from :class:`Settings`, so every flag is documented
by its field's docstring and also readable from ``OPTISERVE_<NAME>``; a flag given wins over the env."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimizers import cli as optimizer_cli
from server.convert import cli as convert_cli
from server.settings import Settings


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env OPTISERVE_{name.upper()}, default {default!r}]"
        annotation = field.annotation
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(annotation), **kwargs)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, type=lambda text: [p for p in text.split(",") if p], **kwargs)
        else:
            converters: dict[Any, Callable[[str], Any]] = {int: int, float: float, Path: Path}
            parser.add_argument(flag, type=converters.get(annotation, str), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="optiserve", description="Serve ONNX models over KServe V2 / Triton's protocol."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model repository over HTTP and gRPC")
    _add_setting_flags(serve)
    optimize = commands.add_parser(
        "optimize", help="run the load-time optimization pipeline offline on one ONNX file and print its report"
    )
    optimizer_cli.add_arguments(optimize)
    convert = commands.add_parser(
        "convert", help="convert your own trusted framework model (pickles too) to ONNX offline, with the same guard"
    )
    convert_cli.add_arguments(convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``optiserve`` script and ``python -m server``."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        from server.app import serve

        serve(Settings(**args))
    elif command == "optimize":
        raise SystemExit(optimizer_cli.run(argparse.Namespace(**args)))
    elif command == "convert":
        raise SystemExit(convert_cli.run(argparse.Namespace(**args)))


if __name__ == "__main__":
    main()
