"""Predicting a training step's memory and compute from a model's configuration alone (``peftlab estimate``).

The model is built on the meta device (shapes and dtypes, no weights: a 70B configuration builds in seconds), the
method is attached as for training, and one training forward pass runs on meta tensors of the given batch and
length while ``saved_tensors_hooks`` record what the backward pass would keep, by the rule the benchmark's measured
memory split uses (``peftlab.bench.measure``: each storage once, parameters and buffers left out; meta tensors have
no storage, so here a tensor's root view stands for it), so estimate and measurement count the same things:

- ``weights``: every parameter and buffer, in its storage dtype (``--dtype``; what trains is kept in fp32, as
  ``peftlab train`` keeps it; QLoRA's base counts its 4-bit codes and double-quantised constants);
- ``gradients``: one fp32 gradient per trainable parameter;
- ``optimizer``: AdamW's two fp32 moments per trainable parameter;
- ``activations``: the tensors saved for backward, each storage once, parameters and buffers left out; with
  gradient checkpointing, what the checkpoints keep plus one block's recomputed activations. Attention is counted
  as a fused kernel keeps it (flash or memory-efficient attention on GPUs, the flash kernel on CPUs: queries, keys,
  values, output and the log-sum-exp rows, never the T x T matrix), since PyTorch's meta device would otherwise
  take its reference path, which saves the matrix; with attention dropout (BERT-style encoders in training) the
  reference path is kept, as the CPU's kernel does (GPU kernels fuse dropout too: there it is an upper bound);
- ``total``: their sum, the peak of a step to within the allocator's slack and the framework's own workspace (a
  CUDA context takes 0.3-1 GB on top; see docs/scale.md).

With ``nproc`` FSDP processes, weights, gradients and optimiser state are split across them, each process keeping
one gathered block besides; activations are per process, for its own batch. FLOPs per token follow the usual
count: 2 per weight for the forward pass, 2 for the input gradients, 2 more for the weight gradients of what trains,
another forward pass with checkpointing, plus attention's score and value products.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .core.attach import attach
from .core.precision import STORAGE, keep_trainable_fp32
from .core.registry import all_methods, get_method
from .errors import InputError, require

PARTS = ("weights", "gradients", "optimizer", "activations")


@dataclass
class EstimateOptions:
    model: str = field(
        default="minilm",
        metadata={"help": "packaged model name, model folder, Hub ID (only its config.json is read) or a config.json"},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of --model"})
    task: Literal["auto", "classify", "sft", "seq2seq"] = field(
        default="auto",
        metadata={"help": "classify (a new head), sft (decoder LM) or seq2seq (encoder-decoder LM); auto: by model"},
    )
    method: str | None = field(
        default=None, metadata={"help": "the method to estimate (default: every method that attaches with defaults)"}
    )
    batch_size: int = field(default=1, metadata={"help": "examples per micro-batch (per process)"})
    length: int = field(default=512, metadata={"help": "tokens per example (input and target, for seq2seq)"})
    dtype: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={"help": "storage of the frozen base"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "estimate with activation checkpointing"})
    nproc: int = field(default=1, metadata={"help": "FSDP processes the model state is sharded over"})
    labels: int = field(default=2, metadata={"help": "classes of the classification head"})
    gpu_memory: float | None = field(default=None, metadata={"help": "GPU memory in GiB: say which methods fit"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model's config"})

    def __post_init__(self):
        require(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        require(self.length > 1, "length", "an integer > 1", self.length)
        require(self.nproc > 0, "nproc", "a positive integer", self.nproc)
        require(self.labels > 1, "labels", "an integer > 1", self.labels)
        require(self.gpu_memory is None or self.gpu_memory > 0, "gpu_memory", "a positive number", self.gpu_memory)


# --- the model, from its configuration alone ---------------------------------------------------------------


def load_config(options: EstimateOptions):
    """The model's configuration: a config.json, or the config of a packaged model, folder or Hub ID."""
    from transformers import AutoConfig

    from .models import MODEL_NAMES, locate

    name = options.model
    path = Path(name).expanduser()
    if name in MODEL_NAMES:
        path = locate(name, quiet=True)
    elif path.is_file() and path.suffix != ".json":
        raise InputError(f"model: {path} is a file but not a config.json")
    try:
        source = str(path) if path.exists() else name
        return AutoConfig.from_pretrained(
            source, revision=options.revision, trust_remote_code=options.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"model: cannot read the configuration of {name!r} ({str(e).splitlines()[0]})") from None


def task_of(config, task: str) -> str:
    if task != "auto":
        return task
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    names = " ".join(getattr(config, "architectures", None) or [])
    return "sft" if "CausalLM" in names or "LMHead" in names else "classify"


def meta_model(config, task: str, labels: int, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    config = config.__class__.from_dict(config.to_dict())  # a copy: the head's label count is set on it
    if task == "classify":
        config.num_labels = labels
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    auto = {"sft": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}.get(task, AutoModelForSequenceClassification)
    with torch.device("meta"):
        try:
            return auto.from_config(config, dtype=dtype)
        except ValueError as e:
            raise InputError(f"task: {task} does not fit this model ({str(e).splitlines()[0]})") from None


# --- counting ---------------------------------------------------------------------------


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def unique_bytes(tensors) -> int:
    """Bytes of ``tensors``, each underlying tensor once (views of one base count as their base)."""
    roots = {id(r): r for r in (_root(t) for t in tensors if t is not None)}
    return sum(r.numel() * r.element_size() for r in roots.values())


def saved_bytes(model: nn.Module, step) -> int:
    """Bytes ``step()`` saves for backward, each base tensor once, the model's parameters and buffers left out."""
    own = {id(_root(t)) for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        root = _root(t)
        if id(root) not in own:
            kept[id(root)] = root  # held, so that ids stay unique while counting
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention_on_meta():
        step()
    return sum(r.numel() * r.element_size() for r in kept.values())


class _FusedAttentionShapes(torch.autograd.Function):
    """The shapes of a fused attention kernel: output (..., T, Dv), saving q, k, v, the output and fp32 log-sum-exp
    rows for the backward pass, as flash and memory-efficient attention do."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Inside, ``scaled_dot_product_attention`` on meta tensors keeps what a fused kernel keeps, and transformers'
    packed-sequence check skips meta positions (other devices are untouched)."""
    original = F.scaled_dot_product_attention

    def shapes(query, key, value, *args, **kwargs):
        dropout = kwargs.get("dropout_p", args[1] if len(args) > 1 else 0.0)
        if not query.is_meta or dropout:  # with attention dropout the CPU kernel takes the reference path too
            return original(query, key, value, *args, **kwargs)
        return _FusedAttentionShapes.apply(query, key, value)  # grouped keys and values are kept as they are

    from transformers import masking_utils

    find_packed = masking_utils.find_packed_sequence_indices

    def no_packing_on_meta(position_ids):  # the packed-sequence check reads values, which meta tensors lack
        return None if position_ids.is_meta else find_packed(position_ids)

    F.scaled_dot_product_attention = shapes
    masking_utils.find_packed_sequence_indices = no_packing_on_meta
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        masking_utils.find_packed_sequence_indices = find_packed


def meta_batch(task: str, batch: int, length: int, labels: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    if task == "classify":
        return {"input_ids": ids, "labels": torch.zeros(batch, dtype=torch.long, device="meta")}
    return {"input_ids": ids, "attention_mask": None, "labels": ids}


def training_loss(model: nn.Module, task: str, batch: dict[str, torch.Tensor], labels: int) -> torch.Tensor:
    """The loss ``peftlab train`` computes (the chunked target-only loss for decoders), or the model's own for
    encoder-decoders (which ``peftlab train`` does not train)."""
    from .train.lm_task import LanguageModelTask
    from .train.loop import ClassificationTask

    if task == "sft":
        return LanguageModelTask().loss(model, batch)
    if task == "seq2seq":
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    return ClassificationTask(labels).loss(model, batch)


def nf4_bytes(numel: int, block: int, double: bool, group: int) -> float:
    """Storage of one NF4 weight of ``numel`` entries: packed codes plus absmax constants (quant/nf4.py)."""
    blocks = math.ceil(numel / block)
    constants = blocks + 4 * math.ceil(blocks / group) + 4 if double else 4 * blocks
    return math.ceil(numel / 2) + constants


def flops_per_token(model: nn.Module, trainable: int, config, length: int, checkpointing: bool, task: str) -> int:
    """Training FLOPs per token: 2 per weight forward, 2 for input gradients, 2 for trained weights' gradients,
    2 more with recomputation, plus attention's products (causal: half the context on average)."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None) or 0
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 0
    context = length / 2 if task == "sft" else length
    attention = 4 * layers * context * width  # scores and weighted values, forward
    forward = 2 * weights + attention
    return int(forward * (3 if checkpointing else 2) + attention + 2 * trainable)


# --- one estimate ---------------------------------------------------------------------------


def estimate(options: EstimateOptions, method: str, method_config: Any | None = None, config=None) -> dict:
    """The memory split (bytes) and FLOPs per token of one training step of ``method`` on the model."""
    from .train.loop import enable_gradient_checkpointing

    config = config if config is not None else load_config(options)
    task = task_of(config, options.task)
    dtype = STORAGE[options.dtype]
    model = meta_model(config, task, options.labels, dtype)
    quantised = method == "qlora"
    if quantised:  # NF4 on meta tensors cannot run: LoRA's layers, with the base linear weights counted as NF4
        qlora = method_config or get_method("qlora").config()
        lora_options = {f.name: getattr(qlora, f.name) for f in dataclasses.fields(get_method("lora").config)}
        method_config = get_method("lora").config(**lora_options)
    attachment = attach(model, "lora" if quantised else method, method_config)
    # Activations first, with every tensor in the base's dtype: autocast cannot run on the meta device, so a half-
    # precision base is estimated as if autocast computed everything in its dtype (plus, below, the half-precision
    # copies autocast makes of the fp32 matrices that train).
    batch = meta_batch(task, options.batch_size, options.length, options.labels)
    blocks = _blocks(model)
    model.train()
    activations = saved_bytes(model, lambda: training_loss(model, task, batch, options.labels))
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        kept = saved_bytes(model, lambda: training_loss(model, task, batch, options.labels))
        block_count = len(blocks) if blocks is not None else 1
        activations = kept + (activations - kept) // block_count  # one block recomputed at a time
    keep_trainable_fp32(model, attachment.initial)  # then the state, as peftlab train keeps it
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dtype != torch.float32:  # autocast saves a half-precision copy of every fp32 matrix a product uses
        activations += sum(p.numel() * dtype.itemsize for p in _autocast_matrices(model, trainable))
    gradient_bytes = unique_bytes(trainable)
    weights = unique_bytes([*model.parameters(), *model.buffers()])
    if quantised:
        for layer in attachment.layers().values():
            w = layer.base.weight
            weights -= w.numel() * w.element_size()
            weights += nf4_bytes(w.numel(), qlora.quant_block_size, qlora.double_quant, qlora.double_quant_block_size)
    split = {"weights": weights, "gradients": gradient_bytes, "optimizer": 2 * gradient_bytes}
    if options.nproc > 1:  # FSDP: state split across processes, one gathered block besides
        largest_block = max((unique_bytes(list(b.parameters())) for b in blocks or []), default=0)
        split = {k: math.ceil(v / options.nproc) for k, v in split.items()}
        split["weights"] += largest_block
    split["activations"] = int(activations)
    split["total"] = sum(split[p] for p in PARTS)
    count = sum(p.numel() for p in trainable)
    flops = flops_per_token(model, count, config, options.length, options.gradient_checkpointing, task)
    return {"method": method, "task": task, "trainable": count, "memory": split, "flops_per_token": flops}


def _autocast_matrices(model: nn.Module, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
    """The trainable matrices that enter matrix products (cast by autocast): all but input embeddings that are not
    also the output layer."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    lookup_only = {id(embedding.weight)} if embedding is not None else set()
    if output is not None and getattr(output, "weight", None) is not None:
        lookup_only.discard(id(output.weight))
    return [p for p in trainable if p.ndim >= 2 and id(p) not in lookup_only]


def _blocks(model: nn.Module) -> nn.Module | None:
    """The model's list of transformer blocks, or None when it has none."""
    from .core.layouts import find_blocks

    try:
        return model.get_submodule(find_blocks(model))
    except InputError:
        return None


def estimate_all(options: EstimateOptions) -> list[dict]:
    """Every registered method that attaches to the model with its defaults, each estimated (those that cannot
    attach, such as AdapterFusion without stage-one adapters or BitFit on a model without biases, are skipped)."""
    config = load_config(options)
    rows = []
    for method in (m.name for m in all_methods()):
        try:
            rows.append(estimate(options, method, config=config))
        except InputError as e:
            rows.append({"method": method, "skipped": str(e).splitlines()[0]})
    return rows


def as_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
