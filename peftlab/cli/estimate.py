"""``peftlab estimate``: predicted memory and FLOPs of a training step, from the model's configuration alone."""

from __future__ import annotations

from typing import Any

from ..errors import InputError, suggest
from .options import Parser, add_fields, cli_values


def cmd_estimate(argv: list[str], show_progress: bool) -> int:
    from ..core.registry import config_from_dict, get_method
    from ..estimate import EstimateOptions, as_json, estimate, estimate_all, load_config
    from ..report import estimate_table, make_console

    pre = Parser(prog="peftlab estimate", add_help=False)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    method = get_method(known.method) if known.method else None
    parser = Parser(
        prog="peftlab estimate",
        description="Predict a training step's memory (weights, gradients, optimiser state, activations) and FLOPs "
        "per token from the model's configuration, built on the meta device: no weights are loaded.",
    )
    parser.add_argument("--json", action="store_true", help="print the estimates as JSON")
    add_fields(parser.add_argument_group("estimate"), EstimateOptions)
    if method is not None:
        add_fields(parser.add_argument_group(f"method {method.name}"), method.config)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise InputError(f"peftlab estimate: unknown option {bad!r}{suggest(bad.split('=')[0], flags)}")
    values: dict[str, Any] = cli_values(args, [EstimateOptions] + ([method.config] if method else []))
    option_names = {f for f in EstimateOptions.__dataclass_fields__}
    options = config_from_dict(EstimateOptions, {k: v for k, v in values.items() if k in option_names}, "estimate")
    if method is not None:
        method_values = {k: v for k, v in values.items() if k not in option_names}
        method_config = config_from_dict(method.config, method_values, f"method {method.name}")
        rows = [estimate(options, method.name, method_config, config=load_config(options))]
    else:
        rows = estimate_all(options)
    if args.json:
        print(as_json(rows))
        return 0
    make_console().print(estimate_table(rows, options))
    return 0
