"""The peer column: the same cell trained through Hugging Face PEFT, in the same process, through the same loop.

For a method PEFT also has, the peer starts from exactly our starting point: peftlab attaches its method to a
model built with the cell's seed, writes it in the PEFT format (``peftlab.core.hf_peft.export_hf``, which maps our
config to PEFT's), and PEFT loads that folder onto a fresh copy of the same base (``PeftModel.from_pretrained(...,
is_trainable=True)``, or for the soft prompts, which PEFT will not load as trainable, ``get_peft_model`` given the
saved weights), so both hold the same adapter weights and the same task head at step 0. PEFT's model then
trains in ``peftlab.train.loop.fit`` -- the same data order, batches, AdamW parameter groups, schedule, clipping
and steps -- through ``PeerAttachment``, which offers the loop what it asks of an attachment.

What PEFT's own training code would add is added here too: AdaLoRA's ``update_and_allocate`` after every step
(with that step's gradients, as PEFT asks) and its orthogonality penalty (PEFT adds it inside ``forward`` only
when the model computes the loss from ``labels``; peftlab's tasks compute the loss from the logits).

A method has a peer when PEFT has it: its registry entry converts it to a PEFT kind that is imported back as the
same method (``peer_kind``). A method whose export is another method's kind (DyLoRA and QLoRA write a plain LoRA,
P-tuning v2 writes prefix tuning's prefixes) has none; QLoRA's peer would also need bitsandbytes' 4-bit CUDA
kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.hf_peft import HF_CONFIG, HF_WEIGHTS, export_hf, peft_kind
from ..core.hooks import TrainingHooks
from ..core.registry import ParamGroup, get_method, peft_importer
from ..errors import InputError
from ..methods.lora import INITIAL_PRODUCT_INITS
from ..methods.p_tuning import position_index


def peer_kind(method: str) -> str | None:
    """The PEFT kind of ``method``'s peer (``peft_kind``: peft_type, "LORA+DORA" for DoRA), or None when PEFT has no
    such method: the method converts to a kind PEFT imports back as this same method."""
    peft = get_method(method).peft
    if peft is None or peft_importer(peft.kind) is not get_method(method):
        return None
    return peft.kind


TASK_TYPES = {"classify": "SEQ_CLS", "tag": "TOKEN_CLS", "span": "QUESTION_ANS", "sft": "CAUSAL_LM"}


def peer_note(method: str, config=None, task_kind: str | None = None) -> str | None:
    """None when ``method`` (with ``config``, on a task of ``task_kind``) can have a like-for-like peer, else why not.

    ``task_kind`` matters for P-tuning at position ``auto``: in front on a decoder ("sft"), a peer; after [CLS] on an
    encoder, none. Without a kind the encoder reading is taken (the stricter one).
    """
    if peer_kind(method) is None:
        return f"Hugging Face PEFT has no {method!r}"
    if getattr(config, "init", None) in INITIAL_PRODUCT_INITS:
        return (
            f"a {config.init} adapter is written for PEFT as a plain LoRA of rank 2r, which would train other "
            "parameters (PEFT's own PiSSA rewrites the base weights instead)"
        )
    if method == "prefix_tuning" and getattr(config, "projection", False):
        return (
            "prefix tuning through the MLP goes to PEFT as the prefixes it computes, which PEFT would train directly "
            "(projection = false gives a peer)"
        )
    if method == "p_tuning" and position_index(str(getattr(config, "position", "front")), task_kind == "sft") != 0:
        return (
            f"P-tuning at position {config.position!r} (after [CLS] on encoders) has no PEFT counterpart: PEFT puts "
            'the prompt in front (position = "front" gives a peer)'
        )
    return None


class PeerAttachment:
    """A PEFT model dressed as a peftlab ``Attachment`` as far as the training loop and the step timer need."""

    masks: dict = {}

    def __init__(self, model: nn.Module, kind: str):
        self.model = model
        self.kind = kind

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[tuple[ParamGroup, list[nn.Parameter]]]:
        """PEFT's model trains at one rate, but its task head (``modules_to_save``) at the head rate, as ours."""
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        head = [p for n, p in trained if ".modules_to_save." in n]
        rest = [p for n, p in trained if ".modules_to_save." not in n]
        groups = [(ParamGroup("*.modules_to_save.*", head=True), head), (ParamGroup("*"), rest)]
        return [(g, params) for g, params in groups if params]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def mask_gradients(self) -> None:
        pass

    def restore_masked(self) -> None:
        pass

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors (what a checkpoint of the loop holds)."""
        return {
            n: p.detach().to("cpu").contiguous().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        for n, p in self.model.named_parameters():
            if n in snapshot:
                p.copy_(snapshot[n])


def build_peer(attachment, fresh_model: nn.Module, kind: str, folder: Path, total_steps: int) -> PeerAttachment:
    """PEFT's model for ``attachment``'s method, starting from its current weights, on ``fresh_model`` (a new copy
    of the same base, head included)."""
    from peft import PeftModel

    expected = peer_kind(attachment.method.name)
    export_hf(attachment, folder, task_type=TASK_TYPES[kind])
    config_path = folder / HF_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if peft_kind(config) != expected:
        raise InputError(f"{attachment.method.name}: exported as PEFT {peft_kind(config)!r}, not {expected!r}")
    if expected == "ADALORA":
        _adalora_for_training(attachment, folder, config, total_steps)
    if attachment.method.peft.full_keys:  # PEFT's prompt-learning kinds
        model = _prompt_learning_for_training(fresh_model, folder)
    else:
        model = PeftModel.from_pretrained(fresh_model, str(folder), is_trainable=True)
    peer = PeerAttachment(model, expected)
    ours = attachment.trainable_count()
    if peer.trainable_count() != ours:  # e.g. a saved form that differs from the trained one
        raise InputError(
            f"{attachment.method.name}: PEFT's model trains {peer.trainable_count():,} parameters, peftlab's {ours:,}: "
            "not a like-for-like peer"
        )
    return peer


def _prompt_learning_for_training(fresh_model: nn.Module, folder: Path) -> nn.Module:
    """PEFT refuses to load a saved prompt-learning adapter as trainable; its training path is ``get_peft_model``
    with the config, which is then given the saved weights (virtual tokens, prompt encoder, task head)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = False
    model = get_peft_model(fresh_model, config)
    loaded = set_peft_model_state_dict(model, load_file(str(folder / HF_WEIGHTS)))
    # PEFT loads the virtual tokens ("prompt_embeddings") into the prompt encoder itself, then lists them as
    # unexpected by the rest of the model.
    left = [k for k in loaded.unexpected_keys if k != "prompt_embeddings"]
    if left:
        raise InputError(f"{folder}: PEFT did not take these saved tensors: {', '.join(left)}")
    return model


def _adalora_for_training(attachment, folder: Path, config: dict, total_steps: int) -> None:
    """An AdaLoRA adapter written for PEFT holds only its kept triplets (none at the start, when every singular
    value is zero) and no schedule; to train, PEFT needs every triplet and peftlab's schedule for this run."""
    from safetensors.torch import load_file, save_file

    from ..core.hf_peft import HF_WEIGHTS, PREFIX

    tensors = load_file(str(folder / HF_WEIGHTS))
    for name, layer in attachment.layers().items():
        for key in ("lora_A", "lora_E", "lora_B"):
            tensors[f"{PREFIX}{name}.{key}"] = getattr(layer, key).detach().contiguous().clone()
    save_file(tensors, str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    tinit = attachment.config.tinit if attachment.config.tinit is not None else total_steps // 10
    tfinal = attachment.config.tfinal if attachment.config.tfinal is not None else (3 * total_steps) // 10
    config.update(tinit=tinit, tfinal=tfinal, total_step=total_steps, rank_pattern=None)
    (folder / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


class PeftAdaLoraHooks(TrainingHooks):
    """What PEFT's AdaLoRA asks of a training loop: its orthogonality penalty in the loss and
    ``update_and_allocate(step)`` after the optimiser step, with that step's gradients still in place."""

    def __init__(self, peer: PeerAttachment):
        self.tuner = peer.model.base_model
        self.adapter = self.tuner.trainable_adapter_name
        self.config = self.tuner.peft_config[self.adapter]
        self.factors = [
            (name, p)
            for name, p in peer.model.named_parameters()
            if p.requires_grad and any(f"lora_{x}.{self.adapter}" in name for x in ("A", "B"))
        ]
        self.grads: dict[str, torch.Tensor] = {}

    def penalty(self) -> torch.Tensor | None:
        """PEFT's penalty: the mean over P and Q matrices of ||P^T P - I||_F (or ||Q Q^T - I||_F), unsquared."""
        if not self.config.orth_reg_weight or not self.factors:
            return None
        terms = []
        for name, p in self.factors:
            gram = p @ p.T if ".lora_A." in name else p.T @ p
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def after_backward(self, step: int) -> None:
        self.grads = {n: p.grad for n, p in self.tuner.model.named_parameters() if p.grad is not None}

    def after_step(self, step: int, optimizer, scheduler) -> None:
        params = dict(self.tuner.model.named_parameters())
        for n, g in self.grads.items():
            params[n].grad = g
        self.tuner.update_and_allocate(step + 1)
        for n in self.grads:
            params[n].grad = None
        self.grads = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        allocator = self.tuner.rankallocator
        return {
            f"{kind}.{n}": t
            for kind, table in (("ipt", allocator.ipt), ("avg", allocator.exp_avg_ipt), ("unc", allocator.exp_avg_unc))
            for n, t in table.items()
        }


def peer_hooks(peer: PeerAttachment) -> TrainingHooks:
    return PeftAdaLoraHooks(peer) if peer.kind == "ADALORA" else TrainingHooks()


def peer_bytes(peer: PeerAttachment, folder: Path) -> int:
    """Size on disk of the PEFT adapter as PEFT saves it."""
    from ..core.accounting import folder_bytes

    peer.model.save_pretrained(str(folder))
    return folder_bytes(folder)
