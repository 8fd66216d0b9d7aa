"""Every fine-tuning method, one file each; importing this package registers them all."""

from . import full, lora, p_tuning, p_tuning_v2, prefix_tuning, prompt_tuning, qlora  # noqa: F401  (registration)
from .registry import Method, all_methods, config_from_dict, config_to_dict, get_method, register

__all__ = ["Method", "all_methods", "config_from_dict", "config_to_dict", "get_method", "register"]
