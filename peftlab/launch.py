"""Data-parallel training under torchrun: ``torchrun`` starts the processes (``peftlab train --nproc N``), and this
module's ``__main__`` is the entry point each of them runs.

torchrun parses option-like words after the script name with abbreviations allowed, so ``--r 4`` would be taken
for one of its own options; the peftlab arguments therefore travel in ``PEFTLAB_ARGV`` (JSON) instead.
"""

import json
import os
import sys


def torchrun(nproc: int, argv: list[str]) -> int:
    """``peftlab ARGV`` in ``nproc`` processes under ``torchrun --standalone --nproc_per_node N`` on this machine
    (data-parallel; for several machines call torchrun yourself, see the README); its exit status."""
    import subprocess

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


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(json.loads(os.environ["PEFTLAB_ARGV"])))
