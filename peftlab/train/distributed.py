"""Data-parallel training on torch.distributed: the process group, sharding, gathering, and who writes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process builds the same model from the same seed,
takes its share of every optimiser step's examples, and runs the backward pass; then the gradients of the
parameters that train -- only those: the frozen base causes no gradient traffic at all -- are summed across
processes in one all-reduce of a single flat buffer. Each process weights its examples by 1 / (examples in the
whole step), so the sum is exactly the gradient a single process computes for the same global batch: the
learning-rate schedule, the number of steps and the global batch stay those of a single-process run. A parameter
no process produced a gradient for keeps none (as in a single process, so AdamW skips it the same way); that also
makes methods that leave parameters unused in a step (AdapterDrop, DyLoRA) work unchanged.

Evaluation is sharded too (process r scores examples r, r + N, ...), the partial results are gathered, and every
process computes the same metrics from all of them. Only rank 0 writes files (config, checkpoints, the adapter,
results); the others wait at a barrier where a later step reads what rank 0 wrote.

The backend is NCCL on GPUs and Gloo on CPUs (the CPU path is what the tests run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..core.layouts import find_blocks


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # FSDP: the model's parameters are sharded across processes

    @property
    def for_evaluation(self) -> Distributed:
        """How to evaluate: sharded examples under plain data parallelism; under FSDP every process runs every
        forward pass (they gather weights collectively, so all must make the same calls) and computes the same
        metrics, so evaluation runs as if alone."""
        return SINGLE if self.sharded else self

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's share of ``items``: every world-th item from position rank."""
        return items[self.rank :: self.world]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by the sum over processes (one all-reduce of one flat buffer)."""
        if not self.enabled or not params:
            return
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64) for p in params]
        flat = torch.cat([present, *grads])
        dist.all_reduce(flat)
        seen, offset = flat[: len(params)], len(params)
        for p, had in zip(params, seen.tolist(), strict=True):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if had > 0 else None
            offset += n

    def all_sum(self, value: float) -> float:
        """The sum of ``value`` over all processes (on every process)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Distributed()


def from_environment(device_name: str) -> tuple[Distributed, torch.device | None]:
    """Join the process group torchrun describes (if any); returns the context and the device it implies."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = None
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return Distributed(rank, world, local_rank), device


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: shard every transformer block, then the rest of the model, across the processes. Frozen base weights
    are sharded like the trainable ones; each block's weights are gathered only while it computes."""
    from torch.distributed.fsdp import fully_shard

    blocks = model.get_submodule(find_blocks(model, field="fsdp"))
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
