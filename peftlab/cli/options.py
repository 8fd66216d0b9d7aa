"""Options of the command line: the argument parser, flags made from config dataclasses, config files, and the
flags several commands share."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from ..errors import InputError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one InputError line instead of usage text plus exit, and no abbreviations
    (``--r`` must never be taken for ``--resume``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


# --- flags from dataclasses ------------------------------------------------------------------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields(group, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if default not in (None, [], {}):
            help_text += f" (default: {default})"
        # argparse formats help with %: a literal % in a field's help ("30% of the run") must be doubled.
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        origin = typing.get_origin(hint)
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list and typing.get_origin(typing.get_args(hint)[0]) is typing.Literal:
            kwargs.update(nargs="+", choices=typing.get_args(typing.get_args(hint)[0]))
        elif origin is list or (inner and typing.get_origin(inner[0]) is list):  # list[...] or list[...] | None
            item = typing.get_args(hint if origin is list else inner[0])[0]
            kwargs.update(nargs="+", metavar={int: "N", float: "X"}.get(item, "PATTERN"))
        elif origin is dict:
            kwargs.update(nargs="+", metavar="KEY=VALUE", type=key_value)
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif inner and typing.get_origin(inner[0]) is typing.Literal:
            kwargs["choices"] = typing.get_args(inner[0])
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(inner[0] if inner else hint, "TEXT")
        group.add_argument(flag(f.name), **kwargs)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cli_values(namespace: argparse.Namespace, classes: list[type]) -> dict[str, Any]:
    """Explicitly given flags, converted to their fields' types (errors name the flag)."""
    from ..core.registry import coerce

    hints: dict[str, Any] = {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
    values = {}
    for key, value in vars(namespace).items():
        if key not in hints:
            continue
        if typing.get_origin(hints[key]) is dict:
            value = dict(value)
        values[key] = coerce(value, hints[key], flag(key))
    return values


def read_config_file(path: str) -> dict[str, Any]:
    """A flat mapping of option names to values from a TOML, YAML or JSON file (never executes anything)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: config file is not UTF-8 text (byte {e.start})") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise InputError(f"{p}: unknown config format {suffix!r}; expected .toml, .yaml, .yml or .json")
    except InputError:
        raise
    except Exception as e:  # each parser has its own error type; all mean "not valid <format>"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: not a valid {suffix[1:].upper()} file ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a mapping of option = value, found {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# --- flags several commands share ------------------------------------------------------------------------------


def overwrite_argument(parser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (never one of the command's inputs)"
    )


def model_code_arguments(parser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the model (never taken from the run)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a model whose only weights are pickle files (never taken from the run)",
    )


def rebuild_run(args, show_progress: bool):
    """A run folder's trained model, with the code and pickle switches of this command line only."""
    from ..run import rebuild

    return rebuild(args.run, not show_progress, args.trust_remote_code, args.allow_pickle)


def run_into_new_folder(parser, argv: list[str], show_progress: bool):
    """A command that reads a run folder and writes ``--out``: the run and ``--out`` arguments with their switches,
    the output checked before the slow rebuild and again once the base model's folder is known (``--out`` is never
    one of the inputs). Returns (parsed arguments, the rebuilt run as ``rebuild`` gives it)."""
    from ..fileio import check_output

    parser.add_argument("run", help="run folder")
    overwrite_argument(parser)
    model_code_arguments(parser)
    args = parser.parse_args(argv)
    check_output(args.out, [args.run], args.overwrite)
    rebuilt = rebuild_run(args, show_progress)
    run, _, _, prepared, _ = rebuilt
    check_output(args.out, [run, prepared.model_path], args.overwrite)
    return args, rebuilt


def proxy_arguments(parser) -> None:
    group = parser.add_argument_group(
        "proxy-tuning", "decode base + alpha * (expert - anti-expert); the run or --model/--adapter is the expert"
    )
    group.add_argument("--proxy-base", metavar="MODEL", help="the model to steer (packaged name or folder)")
    group.add_argument("--proxy-base-adapter", metavar="DIR", help="an adapter to load onto the proxy base first")
    group.add_argument(
        "--anti-expert", metavar="MODEL", help="the untuned anti-expert (default: the expert's own base model)"
    )
    group.add_argument("--proxy-alpha", type=float, default=1.0, help="strength of the steering (paper: 1)")
