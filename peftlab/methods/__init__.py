"""Every fine-tuning method, one file each; importing this package registers them all."""

from . import bitfit, child_tuning_d, child_tuning_f, fishmask, full, head, last_k, lora  # noqa: F401  (registration)
from .registry import Method, all_methods, config_from_dict, config_to_dict, get_method, register

__all__ = ["Method", "all_methods", "config_from_dict", "config_to_dict", "get_method", "register"]
