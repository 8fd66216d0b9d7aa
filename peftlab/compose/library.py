"""Reading trained LoRA adapters as plain low-rank factors, for the composition tools (merge, LoRAHub, serving).

A peftlab LoRA layer computes ``s * (B A - B0 A0) x`` (``B0 A0`` only for PiSSA / MiLoRA). Every composition tool
wants that update as one product of two factors, so each adapted module is read as::

    down = [A; A0]          (r', in)
    up   = s * [B, -B0]     (out, r')      so that  up @ down = s * (B A - B0 A0)

with r' = r, or 2r for PiSSA / MiLoRA. The task head an adapter trained (``classifier``, ...) is kept apart from
the body: adapters of different tasks have heads of different shapes, and the tools decide what to do with them.

Adapters are compared by their *body* signature (the base model's parameter names and shapes without the task
heads), so a 3-class tweet adapter and a 2-class review adapter of the same MiniLM count as the same base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import adapter_file
from ..errors import InputError
from ..methods import config_from_dict
from ..methods.adapter_fusion import adapter_folder, body_signature
from ..methods.lora import LoraConfig, lora_scaling, plain_factors

COMPOSABLE = ("lora",)


@dataclass
class LoraModule:
    """One trained LoRA adapter as factors: ``factors[module] = (down (r', in), up (out, r'))``, scaling folded
    into ``up``; ``head`` holds the task head's tensors by base name."""

    name: str
    folder: Path
    meta: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def body(self) -> dict[str, list[int]]:
        return body_signature(self.meta["base"]["parameters"], self.meta["trainable_modules"])

    @property
    def labels(self) -> list[str] | None:
        return self.meta.get("task", {}).get("labels")

    def delta(self, module: str) -> torch.Tensor:
        """The module's weight update ``s (B A - B0 A0)``, (out, in)."""
        down, up = self.factors[module]
        return up @ down


def read_lora(path: str | Path, name: str | None = None) -> LoraModule:
    """Read a LoRA adapter folder (or a run folder holding one in ``adapter/``) into factors, in float32."""
    folder, meta = adapter_file.read_adapter_meta(adapter_folder(str(path)))
    if meta["method"] not in COMPOSABLE:
        raise InputError(
            f"{folder}: a {meta['method']!r} adapter cannot be composed (composable: {', '.join(COMPOSABLE)})"
        )
    config = config_from_dict(LoraConfig, meta["config"], source=f"{folder / adapter_file.CONFIG_FILE}: config")
    tensors = adapter_file.read_tensors(folder / adapter_file.WEIGHTS_FILE)
    factors = {}
    for module in meta["targets"]:
        try:
            A, B = tensors[f"{module}.lora_A"].float(), tensors[f"{module}.lora_B"].float()  # (r, in), (out, r)
        except KeyError:
            raise InputError(f"{folder}: no LoRA factors for adapted module {module!r}") from None
        r, alpha = config.rank_and_alpha(module)
        # PiSSA / MiLoRA subtract a frozen initial product: the update B A - B0 A0 is one plain product of rank 2r.
        A0, B0 = (tensors.get(f"{module}.lora_{x}0") for x in "AB")
        down, up = plain_factors(A, B, A0 if A0 is None else A0.float(), B0 if B0 is None else B0.float())
        factors[module] = (down, up * lora_scaling(r, alpha, config.rslora))
    heads = tuple(h + "." for h in meta["trainable_modules"])
    head = {k: v for k, v in tensors.items() if k.startswith(heads)}
    return LoraModule(name or default_name(folder), folder, meta, factors, head)


def default_name(folder: Path) -> str:
    """The run's dataset name when the folder is a run's ``adapter/``, else the folder's name."""
    if folder.name == "adapter":
        config = folder.parent / "config.json"
        if config.exists():
            from ..fileio import read_json

            data = str(read_json(config, "run config").get("data", ""))
            if data:
                return Path(data).stem if ("/" in data or "." in data) else data
        return folder.parent.name
    return folder.name


def read_library(paths: Sequence[str | Path]) -> list[LoraModule]:
    """Read several LoRA adapters and check that they share one base body (one-line error naming the odd one)."""
    if not paths:
        raise InputError("adapters: expected one or more LoRA adapter folders, got none")
    modules: list[LoraModule] = []
    taken: set[str] = set()
    for path in paths:
        module = read_lora(path)
        unique, k = module.name, 2
        while unique in taken:
            unique, k = f"{module.name}_{k}", k + 1
        module.name = unique
        taken.add(unique)
        modules.append(module)
    first = modules[0]
    for other in modules[1:]:
        check_same_body(first, other)
    return modules


def check_same_body(first: LoraModule, other: LoraModule) -> None:
    here, there = other.body, first.body
    difference = adapter_file.base_difference(here, there, ("it", str(first.folder)), ("there", f"in {first.folder}"))
    if difference is not None:
        raise InputError(
            f"adapters: {other.folder} was trained on a different base model than {first.folder}: {difference} "
            f"(body fingerprints {adapter_file.fingerprint(here)[:12]} vs {adapter_file.fingerprint(there)[:12]})"
        )


def check_model(model: torch.nn.Module, modules: Sequence[LoraModule]) -> None:
    """Refuse a model whose body is not the adapters' base."""
    here = body_signature(adapter_file.base_signature(model), adapter_file.task_head_names(model))
    there = modules[0].body
    difference = adapter_file.base_difference(here, there, ("the model", "the adapters' base"), ("here", "there"))
    if difference is not None:
        raise InputError(f"model: its body is not the base the adapters were trained on ({difference})")
