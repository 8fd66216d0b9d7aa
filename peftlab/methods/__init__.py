"""Every fine-tuning method, one file each; importing this package registers them all."""

from ..core.registry import Method, all_methods, config_from_dict, config_to_dict, get_method, register
from . import (  # noqa: F401  (registration side effect)
    adalora,
    adapter_fusion,
    bitfit,
    child_tuning_d,
    child_tuning_f,
    diff_pruning,
    dora,
    dylora,
    fishmask,
    full,
    head,
    houlsby,
    ia3,
    last_k,
    lora,
    lst,
    mam,
    p_tuning,
    p_tuning_v2,
    parallel,
    pfeiffer,
    prefix_tuning,
    prompt_tuning,
    qlora,
    relora,
    unipelt,
)

__all__ = ["Method", "all_methods", "config_from_dict", "config_to_dict", "get_method", "register"]
