"""peftlab: parameter-efficient fine-tuning of pretrained transformers.

import peftlab
adapter = peftlab.attach(model, "lora", r=8, alpha=16, targets=["query", "value"])
...train adapter.trainable_parameters()...
adapter.save("my-adapter")
adapter.merge()                      # zero extra latency
model = adapter.unload()             # a plain model again
"""

from .core.accounting import changed_parameters, delta_ranks, parameter_counts
from .core.attach import Attachment, attach, load_adapter
from .core.hf_peft import export_hf, import_hf
from .errors import InputError, PeftlabError

# Importing the methods package registers every method (core's registry is filled here, not by core itself).
from .methods import all_methods, get_method
from .version import __version__

__all__ = [
    "__version__",
    "Attachment",
    "InputError",
    "PeftlabError",
    "all_methods",
    "attach",
    "changed_parameters",
    "delta_ranks",
    "export_hf",
    "get_method",
    "import_hf",
    "load_adapter",
    "parameter_counts",
]
