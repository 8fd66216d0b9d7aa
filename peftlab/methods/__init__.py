"""Every fine-tuning method, one file each; importing this package registers them all."""

from . import adalora, adapter_fusion, dora, dylora, full, houlsby, ia3, lora, parallel, pfeiffer, qlora, relora  # noqa: F401  (registration side effect)
from .registry import Method, all_methods, config_from_dict, config_to_dict, get_method, register

__all__ = ["Method", "all_methods", "config_from_dict", "config_to_dict", "get_method", "register"]
