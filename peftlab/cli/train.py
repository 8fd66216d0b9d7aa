"""``peftlab train``: flags from the run options, training settings and the method's config, over a config file or
a run folder's saved configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError, suggest
from .options import Parser, add_fields, cli_values, flag, read_config_file


def cmd_train(argv: list[str], show_progress: bool) -> int:
    from ..methods import get_method
    from ..report import print_results
    from ..run import RunOptions, resume_config, run_training, split_config, without_command_line_only
    from ..train.loop import TrainSettings

    pre = Parser(prog="peftlab train", add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None)
    pre.add_argument("--method", default=None)
    pre.add_argument("--nproc", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.nproc is not None:
        return launch_processes(known.nproc, argv)
    file_values: dict[str, Any] = {}
    source = "command line"
    if known.resume:
        run, file_values = resume_config(known.resume)
        source = str(Path(run) / "config.json")
    elif known.config:
        file_values = read_config_file(known.config)
        source = known.config
    # Running a model's own code, or unpickling its weights, takes the flag on this very command line.
    file_values = without_command_line_only(file_values)
    method = get_method(known.method or file_values.get("method", RunOptions.method))

    parser = Parser(prog="peftlab train", description="Fine-tune a pretrained model with one method.")
    parser.add_argument("--config", help="TOML, YAML or JSON file of options (flags override it)")
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--nproc", type=int, metavar="N", help="data-parallel: run N processes with torchrun")
    add_fields(parser.add_argument_group("run"), RunOptions)
    add_fields(parser.add_argument_group("training"), TrainSettings)
    add_fields(parser.add_argument_group(f"method {method.name}"), method.config)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
        bad = next(u for u in unknown if u.startswith("-")) if any(u.startswith("-") for u in unknown) else unknown[0]
        raise InputError(
            f"peftlab train: unknown option {bad!r}{suggest(bad.split('=')[0], flags)} "
            f"(method {method.name}; see peftlab train --method {method.name} --help)"
        )
    cli = cli_values(args, [RunOptions, TrainSettings, method.config])
    if known.resume:
        extra = sorted(set(cli) - {"method", "trust_remote_code", "allow_pickle"})
        if extra:
            raise InputError(f"--resume continues a run with its saved configuration; drop {flag(extra[0])}")
        cli["out"] = str(known.resume)
    options, settings, method_config = split_config({**file_values, **cli}, source)
    results = run_training(options, settings, method_config, resume=bool(known.resume), show_progress=show_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process prints
        print_results(results)
        for name, f in results.get("forgetting", {}).items():
            print(
                f"forgetting on {name}: perplexity {f['before']:.3f} before, {f['after']:.3f} after tuning "
                f"({100 * f['relative_change']:+.1f}%, {f['documents']} documents, {f['tokens']} tokens)"
            )
    return 0


def launch_processes(nproc: int, argv: list[str]) -> int:
    """``peftlab train --nproc N ...``: the same command, less --nproc and with the global options before it, under
    torchrun on this machine."""
    if nproc < 1:
        raise InputError(f"--nproc: expected a positive integer, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    prefix = [a for a in sys.argv[1 : sys.argv.index("train")] if a != "--debug"] if "train" in sys.argv else []
    return torchrun(nproc, [*prefix, "train", *rest])


def torchrun(nproc: int, argv: list[str]) -> int:
    """``peftlab ARGV`` in ``nproc`` processes under ``torchrun --standalone --nproc_per_node N`` on this machine
    (data-parallel; for several machines call torchrun yourself, see the README); its exit status."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "peftlab.launch",
    ]
    env = {
        **os.environ,
        "PEFTLAB_ARGV": json.dumps(argv),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    return subprocess.call(command, env=env)
