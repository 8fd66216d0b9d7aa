"""One fine-tuning run, from names to a finished run folder, and what is done with the folder afterwards.

- ``options``: ``RunOptions``, and a flat configuration split into options, training settings and method config;
- ``prepare``: the model and data resolved and tokenised (``prepare_data``), the model built (``build_model``);
- ``training``: ``run_training``, which trains with the shared loop and writes the run folder;
- ``folders``: a run folder read back (``rebuild``), resumed, evaluated, merged, or an imported PEFT adapter;
- ``machine``: what a run records about where it ran.
"""

from .folders import evaluate_run, import_hf_adapter, load_run, rebuild, resume_config, save_merged
from .machine import git_commit, machine, peak_memory, versions
from .options import RunOptions, default_out, flat_config, pick_device, split_config, without_command_line_only
from .prepare import (
    Prepared,
    build_model,
    encode_file,
    generation_metrics,
    generation_sets,
    hf_task_type,
    make_task,
    prepare_data,
    task_meta,
)
from .training import run_training

__all__ = [
    "Prepared",
    "RunOptions",
    "build_model",
    "default_out",
    "encode_file",
    "evaluate_run",
    "flat_config",
    "generation_metrics",
    "generation_sets",
    "git_commit",
    "hf_task_type",
    "import_hf_adapter",
    "load_run",
    "machine",
    "make_task",
    "peak_memory",
    "pick_device",
    "prepare_data",
    "rebuild",
    "resume_config",
    "run_training",
    "save_merged",
    "split_config",
    "task_meta",
    "versions",
    "without_command_line_only",
]
