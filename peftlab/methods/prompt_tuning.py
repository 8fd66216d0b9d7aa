"""Prompt tuning (Lester, Al-Rfou and Constant, 2021, The Power of Scale for Parameter-Efficient Prompt Tuning,
https://arxiv.org/abs/2104.08691).

The frozen model reads m trainable vectors P in front of its embedded input::

    y = f([P; E x])      P: (m, d) soft prompt,  E: the frozen input embedding,  x: the input tokens

Only P (and the task head) train. The vectors enter through ``core.virtual_tokens``: a forward pre-hook on the
task model puts them in front of the input embeddings and widens the attention mask (the prompt is always
visible), token types, positions and LM labels to match; token-level outputs (a tagger's or a language model's
logits) come back trimmed to the caller's tokens. As in Hugging Face PEFT, the prompt comes first, so the real
tokens' positions move m places on, and a BERT classifier pools the output at the first virtual token (which
trains to play the part of [CLS]). A known limit, shared with PEFT: a decoder's sequence classifier (Llama's
``score`` on the last real token) finds that token from ``input_ids``, and given embeddings it reads the last
position instead, which in a right-padded batch is padding for the shorter rows; prefix methods are unaffected.

Initialisation (``init``), following Lester et al.: ``vocab`` copies the embeddings of m tokens sampled from the
vocabulary (uniformly, without repeats while the vocabulary allows); ``labels`` takes, for each class of a
classifier (its ``config.id2label``), the mean embedding of the label's tokens, then fills the remaining slots with
sampled vocabulary; ``text`` repeats the tokens of ``init_text`` (no special tokens) until m are filled (PEFT's
TEXT init keeps the tokenizer's [CLS]/[SEP]); ``random`` draws Gaussian vectors with the standard deviation of the
embedding table itself (Lester et al. draw from [-0.5, 0.5] for T5, whose embeddings are that large; matching the
table keeps the prompt on the model's scale). ``text`` and ``labels`` read the tokenizer from the folder the model
was loaded from (``model.name_or_path``).

The adapter layer wraps the input embedding module, which it leaves as it is, and holds the prompt; unloading it
removes the hooks. Nothing merges into the weights. Export to and import from the Hugging Face PEFT format
(``PROMPT_TUNING``: the prompt as ``prompt_embeddings``) keep the numbers exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..core.adapter import AdapterLayer, replace_module
from ..core.attach import attach, load_state
from ..core.hf_peft import HF_CONFIG, head_modules, head_tensors
from ..core.registry import Method, PeftFormat, register
from ..core.virtual_tokens import insert_virtual_tokens
from ..errors import InputError, require


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": "soft-prompt vectors m put in front of every input"})
    init: Literal["vocab", "labels", "text", "random"] = field(
        default="vocab",
        metadata={
            "help": "initialisation: embeddings of sampled vocabulary, of the class labels, of --init-text, or "
            "Gaussian at the embeddings' scale"
        },
    )
    init_text: str | None = field(default=None, metadata={"help": "text whose token embeddings start the prompt"})

    def __post_init__(self):
        require(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )
        require(self.init in ("vocab", "labels", "text", "random"), "init", "vocab, labels, text or random", self.init)
        if self.init == "text":
            require(bool(self.init_text and self.init_text.strip()), "init_text", "a text when init is 'text'", None)
        else:
            require(self.init_text is None, "init_text", "no text unless init is 'text'", self.init_text)


class SoftPrompt(AdapterLayer):
    """Wraps the input embedding layer (its output is unchanged) and holds the virtual tokens that a forward
    pre-hook on the task model inserts at token position ``at``: trained directly (``prompt``, (m, d)) or computed
    by a prompt ``encoder`` (P-tuning), a module called with no input that returns (m, d)."""

    def __init__(self, base: nn.Module, at: int, prompt: torch.Tensor | None = None, encoder: nn.Module | None = None):
        super().__init__(base)
        if (prompt is None) == (encoder is None):
            raise ValueError("a soft prompt is either trained directly or computed by an encoder")
        self.at = at
        self.prompt = nn.Parameter(prompt) if prompt is not None else None  # (m, d)
        self.encoder = encoder
        self.handle = None

    def install(self, model: nn.Module) -> None:
        """Hook the task model's forward (after this layer took the embedding's place)."""
        self.handle = insert_virtual_tokens(model, self.virtual_tokens, len(self.folded()), self.at, trim_outputs=True)

    def tokens(self) -> torch.Tensor:
        return self.prompt if self.encoder is None else self.encoder()  # (m, d)

    def virtual_tokens(self, batch: int) -> torch.Tensor:
        return self.tokens().unsqueeze(0).expand(batch, -1, -1)  # (B, m, d)

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        if self.encoder is None:
            return {"prompt": self.prompt}
        return {f"encoder.{name}": p for name, p in self.encoder.named_parameters()}

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """The virtual tokens as inference sees them (an encoder run once in eval mode), (m, d)."""
        if self.encoder is None:
            return self.prompt.detach().clone()
        was_training = self.encoder.training
        self.encoder.eval()
        tokens = self.encoder().detach().clone()
        self.encoder.train(was_training)
        return tokens

    def on_unload(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def input_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's input embedding layer and its module name."""
    getter = getattr(model, "get_input_embeddings", None)
    embed = getter() if callable(getter) else None
    weight = getattr(embed, "weight", None)
    if embed is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InputError(
            f"{type(model).__name__} has no input embedding table (get_input_embeddings); soft prompts need one"
        )
    name = next(n for n, m in model.named_modules() if m is embed)
    return name, embed


def attach_soft_prompt(
    model: nn.Module, at: int, make: Callable[[nn.Module], tuple[torch.Tensor | None, nn.Module | None]]
) -> list[str]:
    """Wrap the input embedding in a SoftPrompt built by ``make(embedding) -> (prompt, encoder)`` and hook the
    model; returns the adapted module's name."""
    name, embed = input_embedding(model)
    prompt, encoder = make(embed)
    layer = SoftPrompt(embed, at, prompt, encoder)
    replace_module(model, name, layer)
    layer.install(model)
    return [name]


def tokenizer_of(model: nn.Module, why: str):
    from ..models import load_tokenizer

    folder = str(getattr(model, "name_or_path", "") or "")
    if not folder or not Path(folder).is_dir():
        raise InputError(
            f"init: {why} needs the model's tokenizer, read from the folder the model was loaded from, "
            "but this model was not loaded from a folder; use init 'vocab' or 'random'"
        )
    return load_tokenizer(Path(folder))


def sampled_vocabulary(table: torch.Tensor, count: int) -> torch.Tensor:
    """Embeddings of ``count`` tokens drawn uniformly from the vocabulary (without repeats while it allows)."""
    vocab = table.shape[0]
    ids = torch.randperm(vocab)[:count] if count <= vocab else torch.randint(0, vocab, (count,))
    return table[ids.to(table.device)]  # (count, d)


def label_words(model: nn.Module) -> list[str]:
    """The class names of a classifier (``config.id2label``); an error when the model names none."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if not labels or all(re.fullmatch(r"LABEL_\d+", label) for label in labels):
        raise InputError(
            "init: 'labels' needs a classifier whose config names its classes (id2label), "
            f"but {type(model).__name__} has none; use init 'vocab', 'text' or 'random'"
        )
    return labels


@torch.no_grad()
def initial_prompt(model: nn.Module, embed: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """The prompt's starting value, (m, d), on the embedding table's device and dtype."""
    table = embed.weight.detach()  # (V, d)
    m = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(m, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
    if config.init == "vocab":
        return sampled_vocabulary(table, m).clone()
    if config.init == "text":
        tokenizer = tokenizer_of(model, "init 'text'")
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"init_text: {config.init_text!r} has no tokens")
        ids = (ids * (m // len(ids) + 1))[:m]
        return table[torch.tensor(ids, device=table.device)].clone()
    labels = label_words(model)
    tokenizer = tokenizer_of(model, "init 'labels'")
    rows = []
    for label in labels[:m]:
        ids = tokenizer(label, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"init: class label {label!r} has no tokens")
        rows.append(table[torch.tensor(ids, device=table.device)].mean(0))  # a multi-token label: the mean
    rest = sampled_vocabulary(table, m - len(rows)) if m > len(rows) else table[:0]
    return torch.cat([torch.stack(rows), rest])


def apply(model: nn.Module, config: PromptTuningConfig, protected: Sequence[str] = ()) -> list[str]:
    return attach_soft_prompt(model, 0, lambda embed: (initial_prompt(model, embed, config), None))


# --- Hugging Face PEFT format: {"prompt_embeddings": (m, d)} and the task head under "base_model." -------------


def peft_prompt_fields(attachment, prompt: torch.Tensor) -> dict:
    config = attachment.model.config
    return {
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "modules_to_save": attachment.trainable_modules or None,
    }


def peft_head_tensors(attachment) -> dict[str, torch.Tensor]:
    return {f"base_model.{k}": v for k, v in head_tensors(attachment).items()}


def the_soft_prompt(attachment) -> SoftPrompt:
    (layer,) = attachment.layers().values()
    return layer


def _export_prompt_tuning(attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    prompt = the_soft_prompt(attachment).folded()
    fields = {"peft_type": "PROMPT_TUNING", **peft_prompt_fields(attachment, prompt), "prompt_tuning_init": "RANDOM"}
    return fields, {"prompt_embeddings": prompt} | peft_head_tensors(attachment)


def import_peft_prompt(model, cfg: dict, tensors: dict, weights: Path, method: str, config):
    """Attach ``method`` with ``config`` and load PEFT's ``prompt_embeddings`` and task head into it."""
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise InputError(f"{weights.parent / HF_CONFIG}: encoder-decoder prompts are not supported")
    if "prompt_embeddings" not in tensors:
        raise InputError(f"{weights}: no prompt_embeddings tensor")
    prompt = tensors["prompt_embeddings"]
    rest = {k.removeprefix("base_model."): v for k, v in tensors.items() if k != "prompt_embeddings"}
    heads = head_modules(rest, cfg.get("modules_to_save") or [], model, weights)
    attachment = attach(model, method, config, trainable_modules=heads)
    (name,) = attachment.layers()
    load_state(attachment, {f"{name}.prompt": prompt} | rest, weights)
    return attachment


def _import_prompt_tuning(model, cfg: dict, tensors: dict, weights: Path):
    count = int(cfg.get("num_virtual_tokens") or 0)
    config = PromptTuningConfig(num_virtual_tokens=count, init="random")
    return import_peft_prompt(model, cfg, tensors, weights, "prompt_tuning", config)


LARGE_MODEL = 1_000_000_000  # parameters


def caution(model: nn.Module, config: PromptTuningConfig, total_steps: int) -> str | None:
    """Lester et al. (2021): prompt tuning matches fine-tuning only as models reach billions of parameters."""
    size = sum(p.numel() for p in model.parameters())
    if size >= LARGE_MODEL:
        return None
    return (
        f"prompt tuning learns little on a model of {size / 1e6:.0f}M parameters: Lester et al. (2021) match "
        "fine-tuning only from billions of parameters; expect it to trail the other methods here "
        "(p_tuning_v2 or lora learn more on small models)"
    )


METHOD = register(
    Method(
        name="prompt_tuning",
        config=PromptTuningConfig,
        apply=apply,
        family="soft prompts",
        summary="m trainable vectors in front of the input embeddings; the model stays frozen",
        paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (arXiv:2104.08691)",
        lr=3e-2,
        mergeable=False,
        identity_at_init=False,
        peft=PeftFormat("PROMPT_TUNING", export=_export_prompt_tuning, load=_import_prompt_tuning, full_keys=True),
        caution=caution,
    )
)
