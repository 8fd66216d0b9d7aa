"""Proxy-tuning (Liu et al., 2024, "Tuning Language Models by Proxy", arXiv:2401.08565): steer a base model at
decode time with the difference between a tuned *expert* and its untuned *anti-expert*, without touching the
base's weights. At every step t the next-token distribution is::

    p(x_t | x_<t)  ~  softmax( s_base(x_<t) + alpha * ( s_expert(x_<t) - s_anti(x_<t) ) )

with ``s_*`` the models' logits and ``alpha = 1`` in the paper. The three models read the same token ids, so they
must share one vocabulary: ``check_shared_vocabulary`` compares the tokenizers token by token and fails with one
line otherwise (a model may carry extra, never produced rows in its output layer: only the first
``len(tokenizer)`` logits are combined).

Decoding (greedy, or sampling with temperature and top-p) keeps one key/value cache per model: the prompts are
left-padded, each model reads the whole prompt once and then one new token per step, with positions counted from
each row's first real token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from .generation import left_padded_prompts


def check_shared_vocabulary(tokenizers: dict[str, object]) -> int:
    """The shared vocabulary size of the named tokenizers; an InputError naming the first pair that differs."""
    names = list(tokenizers)
    first = tokenizers[names[0]]
    reference = first.get_vocab()
    for name in names[1:]:
        vocab = tokenizers[name].get_vocab()
        if vocab != reference:
            differing = next((t for t, i in reference.items() if vocab.get(t) != i), None)
            example = (
                f"; token {differing!r} is id {reference[differing]} vs {vocab.get(differing)}" if differing else ""
            )
            raise InputError(
                f"proxy-tuning: {names[0]} and {name} do not share a vocabulary ({len(reference)} vs {len(vocab)} "
                f"tokens{example}); base, expert and anti-expert must use one tokenizer"
            )
        if tokenizers[name].eos_token_id != first.eos_token_id:
            raise InputError(f"proxy-tuning: {names[0]} and {name} end turns with different tokens")
    return len(first)


def combine(base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor, vocab: int, alpha: float = 1.0):
    """base + alpha * (expert - anti) over the shared vocabulary: (..., vocab)."""
    return base[..., :vocab].float() + alpha * (expert[..., :vocab].float() - anti[..., :vocab].float())


class _Stream:
    """One model reading a left-padded batch incrementally through its key/value cache."""

    def __init__(self, model):
        self.model = model
        self.cache = None

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits for the last position after reading ``ids`` (B, n); ``mask`` (B, T) covers everything so far."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # (B, n), 0 at each row's first token
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        self.cache = out.past_key_values
        return out.logits[:, -1]  # (B, V)


@torch.no_grad()
def proxy_generate(
    base,
    expert,
    anti_expert,
    tokenizer,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    alpha: float = 1.0,
    vocab: int | None = None,
    trace: list | None = None,
) -> list[str]:
    """Replies to chat prompts decoded from the proxy-tuned distribution (greedy when temperature is 0).
    ``trace``, when given, receives each step's combined logits (B, vocab) for inspection."""
    models = (base, expert, anti_expert)
    device = next(base.parameters()).device
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    vocab = vocab or len(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generator = torch.Generator(device="cpu").manual_seed(seed)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded_prompts(tokenizer, prompts[start : start + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        streams = [_Stream(m) for m in models]
        new = ids
        out: list[list[int]] = [[] for _ in range(len(ids))]
        done = torch.zeros(len(ids), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = combine(*(s.step(new, mask) for s in streams), vocab, alpha)  # (B, vocab)
            if trace is not None:
                trace.append(logits.cpu())
            token = _choose(logits, temperature, top_p, generator)  # (B,)
            token = torch.where(done, torch.full_like(token, pad), token)
            for j, t in enumerate(token.tolist()):
                if not done[j] and t != eos:
                    out[j].append(t)
            done |= token == eos
            if bool(done.all()):
                break
            new = token[:, None]
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        replies.extend(tokenizer.decode(r, skip_special_tokens=True) for r in out)
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return replies


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1).cpu()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
