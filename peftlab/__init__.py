"""peftlab: parameter-efficient fine-tuning of pretrained transformers.

import peftlab
adapter = peftlab.attach(model, "lora", r=8, alpha=16, targets=["query", "value"])
...train adapter.trainable_parameters()...
adapter.save("my-adapter")
adapter.merge()                      # zero extra latency
model = adapter.unload()             # a plain model again
"""

__version__ = "0.1.0"

from .core.accounting import changed_parameters, delta_ranks, parameter_counts  # noqa: E402
from .core.attach import Attachment, attach, load_adapter  # noqa: E402
from .core.hf_peft import export_hf, import_hf  # noqa: E402
from .errors import InputError, PeftlabError  # noqa: E402
from .methods import all_methods, get_method  # noqa: E402

__all__ = [
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
