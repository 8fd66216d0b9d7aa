"""Entry point for the processes ``peftlab train --nproc N`` starts under torchrun.

torchrun parses option-like words after the script name with abbreviations allowed, so ``--r 4`` would be taken
for one of its own options; the peftlab arguments therefore travel in ``PEFTLAB_ARGV`` (JSON) instead.
"""

import json
import os
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(json.loads(os.environ["PEFTLAB_ARGV"])))
