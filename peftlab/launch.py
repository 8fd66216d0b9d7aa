"""The entry point each process runs under torchrun (``peftlab train --nproc N`` starts them: see
``peftlab.cli.train.torchrun``): the peftlab command line from ``PEFTLAB_ARGV`` (JSON).

torchrun parses option-like words after the script name with abbreviations allowed, so ``--r 4`` would be taken
for one of its own options; the peftlab arguments therefore travel in ``PEFTLAB_ARGV`` instead.
"""

import json
import os
import sys

if __name__ == "__main__":
    from peftlab.cli import main

    sys.exit(main(json.loads(os.environ["PEFTLAB_ARGV"])))
