"""The ``peftlab`` command line.

    peftlab train [--config FILE] [--model M] [--data D] [--method NAME] [--out DIR] [method flags...]
    peftlab train --resume RUN
    peftlab eval RUN [--data FILE] [--split test]
    peftlab merge RUN --out DIR
    peftlab export RUN --format hf --out DIR
    peftlab export RUN --format gguf [--out FILE] [--base FILE] [--merged] [--dtype f32|f16]
    peftlab import HF_ADAPTER --out DIR [--model M] [--labels a,b]
    peftlab generate (RUN | --model M [--adapter DIR]) [--prompts FILE|-] [--temperature T] [--proxy-base B]
    peftlab chat (RUN | --model M [--adapter DIR]) [--proxy-base B]
    peftlab baseline --model M --data D [--shots 0 4] [--pet] [--limit N]
    peftlab compose merge ADAPTER... --weights W... --rank R --out DIR [--head NAME|none]
    peftlab compose lorahub ADAPTER... --data TARGET [--k 32] [--budget 40] [--seeds 0 1 2]
    peftlab compose bench [--model M] [--adapters 8] [--rank 8] [--batch-size 32] [--length 64]
    peftlab serve --model M [--adapter NAME=FOLDER ...] [--host H] [--port P] [--max-batch N] [--api-key KEY]
    peftlab methods [NAME]
    peftlab estimate [--model M] [--method NAME] [--batch-size B] [--length T] [--dtype bf16] [--gpu-memory GB]
    peftlab assets list | pull NAME... | verify NAME...
    peftlab bench [--suite NAME|FILE | --quick] [--out DIR] [--report] [--methods L...] [--list]

Every option of ``train`` is a field of ``RunOptions``, ``TrainSettings`` or the method's config; the same names
(with ``-`` or ``_``) are the keys of a TOML, YAML or JSON config file. Precedence: defaults < config file < flags.
Errors print one line, ``error: ...``, and exit with 2 for bad input or usage and 1 otherwise; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import sys

from ..errors import InputError, PeftlabError, suggest
from .adapters import cmd_eval, cmd_export, cmd_import, cmd_merge
from .bench import cmd_bench
from .catalog import cmd_assets, cmd_methods
from .compose import cmd_compose
from .decoding import cmd_baseline, cmd_chat, cmd_generate
from .estimate import cmd_estimate
from .options import Parser
from .serve import cmd_serve
from .train import cmd_train

COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "export": cmd_export,
    "import": cmd_import,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "baseline": cmd_baseline,
    "compose": cmd_compose,
    "serve": cmd_serve,
    "methods": cmd_methods,
    "estimate": cmd_estimate,
    "assets": cmd_assets,
    "bench": cmd_bench,
}


GLOBAL_OPTIONS_WITH_VALUE = ("--cache-dir",)


def _command_index(argv: list[str]) -> int:
    """Where the command is: the first argument that is neither a global option nor the value of one."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in GLOBAL_OPTIONS_WITH_VALUE else 1
    return min(i, len(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = Parser(prog="peftlab", description=__doc__.split("\n\n")[0], add_help=False)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    top.add_argument("--cache-dir", help="asset cache folder (default: $PEFTLAB_CACHE or ~/.cache/peftlab)")
    top.add_argument("--no-progress", action="store_true", help="no progress bars")
    top.add_argument("-h", "--help", action="store_true")
    top.add_argument("command", nargs="?")
    # Global options come before the command; everything after it belongs to the command.
    split = _command_index(argv)
    debug = "--debug" in argv
    try:
        glob = top.parse_args(argv[: split + 1])
        rest = argv[split + 1 :]
        if glob.command is None or glob.help and glob.command is None:
            print(__doc__)
            return 0 if glob.help else 2
        if glob.command not in COMMANDS:
            raise InputError(
                f"unknown command {glob.command!r}{suggest(glob.command, COMMANDS)}; commands: {', '.join(COMMANDS)}"
            )
        from .. import progress
        from ..process import library_warnings_filtered, quiet_libraries

        quiet_libraries()
        if glob.cache_dir:
            from ..assets import set_cache_dir

            set_cache_dir(glob.cache_dir)
        if "--debug" in rest:
            rest.remove("--debug")
        # Bars on a terminal; piped output gets a line for long evaluations instead; --no-progress: neither.
        mode = "off" if glob.no_progress else "bar" if sys.stderr.isatty() else "line"
        try:
            with progress.showing(mode), library_warnings_filtered():
                return COMMANDS[glob.command](rest, show_progress=mode == "bar")
        finally:
            from ..train.distributed import shutdown

            shutdown()
    except PeftlabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        folder = getattr(e, "folder", None)  # a run that can continue (``peftlab.errors.Interrupted``)
        again = f" (continue the run with: peftlab train --resume {folder})" if folder is not None else ""
        print(f"error: interrupted{again}", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the one place that turns surprises into a line
        if debug:
            raise
        print(
            f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
