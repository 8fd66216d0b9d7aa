"""Decoding with a trained or untuned decoder: a run's model or a model with an adapter, proxy-tuning (a base
steered by expert - anti-expert), prompt files, and the training-free baselines of an sft dataset.

Models load here, on the run layer (it rebuilds run folders); the CLI's generate, chat, eval --proxy-base and
baseline commands parse their flags and call these.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError


def load_decoder(
    run: str | None,
    model: str | None,
    adapter: str | None,
    quiet: bool,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """(model, tokenizer, label): a run folder's best adapter on its model, or ``model`` with an optional
    ``adapter``. Code shipped with the model, and pickle weights, only as the caller says."""
    from .core.attach import load_adapter
    from .models import load_causal_lm, load_tokenizer, resolve_model
    from .run import rebuild

    if run:
        run, options, _, prepared, attachment = rebuild(run, quiet, trust_remote_code, allow_pickle)
        if prepared.kind != "sft":
            raise InputError(f"{run}: a {prepared.kind} run has no language-model head to generate with")
        return attachment.model, prepared.tokenizer, f"{run} ({attachment.method.name})"
    if not model:
        raise InputError("give a run folder, or --model (and optionally --adapter)")
    path = resolve_model(model, quiet=quiet, allow_pickle=allow_pickle)
    decoder = load_causal_lm(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    label = model
    if adapter:
        attachment = load_adapter(decoder, adapter)
        label += f" + {attachment.method.name} adapter"
    return decoder, load_tokenizer(path, trust_remote_code), label


def expert_base(run: str | None, model: str | None) -> str:
    """The base model of the expert: a run's configured model, or ``model``."""
    if run:
        from .fileio import read_json

        return str(read_json(Path(run) / "config.json", "run config").get("model"))
    return model


def proxy_decoder(
    expert,
    tokenizer,
    expert_base: str,
    proxy_base: str,
    proxy_base_adapter: str | None,
    anti_expert: str | None,
    alpha: float,
    temperature: float,
    top_p: float,
    trust_remote_code: bool,
    quiet: bool,
):
    """(reply(prompts, max_new_tokens, seed) -> replies, label) decoding ``proxy_base`` steered by the expert
    (a model with its adapter) minus the anti-expert (default: the expert's base). The vocabularies are checked
    first, from the tokenizers alone, before any model is loaded."""
    from .core.attach import load_adapter
    from .evaluate.proxy import check_shared_vocabulary, proxy_generate
    from .models import load_causal_lm, load_tokenizer, resolve_model

    trust = trust_remote_code
    anti_name = anti_expert or expert_base
    base_path = resolve_model(proxy_base, quiet=quiet)
    anti_path = resolve_model(anti_name, quiet=quiet)
    base_tokenizer = load_tokenizer(base_path, trust)
    vocab = check_shared_vocabulary(
        {
            f"{proxy_base} (base)": base_tokenizer,
            f"{expert_base} + adapter (expert)": tokenizer,
            f"{anti_name} (anti-expert)": load_tokenizer(anti_path, trust),
        }
    )
    base = load_causal_lm(base_path, trust_remote_code=trust)
    if proxy_base_adapter:
        load_adapter(base, proxy_base_adapter)
    anti = load_causal_lm(anti_path, trust_remote_code=trust)
    device = next(expert.parameters()).device
    base.to(device)
    anti.to(device)

    def steered(prompts, max_new_tokens, seed):
        options = {"temperature": temperature, "top_p": top_p, "seed": seed, "alpha": alpha}
        return proxy_generate(base, expert, anti, base_tokenizer, prompts, max_new_tokens, vocab=vocab, **options)

    label = f"proxy-tuned {proxy_base}" + (" + adapter" if proxy_base_adapter else "")
    return steered, f"{label} (alpha {alpha:g}; expert - anti-expert {anti_name})"


def read_prompts(source: str) -> list[list[dict[str, str]]]:
    """Prompts from a file or stdin ("-"): JSONL records with "prompt" or "messages", else one prompt per line."""
    from .data.conversations import ROLES

    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{source}:{number}: malformed JSON line ({e.msg})") from None
            messages = record.get("messages") or [{"role": "user", "content": record.get("prompt", "")}]
            if not all(isinstance(m, dict) and m.get("role") in ROLES for m in messages):
                raise InputError(f"{source}:{number}: 'messages' must be a list of {{role, content}} objects")
            prompts.append(messages)
        else:
            prompts.append([{"role": "user", "content": line.strip()}])
    if not prompts:
        raise InputError(f"{source}: no prompts found")
    return prompts


def baselines(
    model_name: str,
    adapter: str | None,
    data_name: str,
    shots: Sequence[int],
    pet: bool,
    limit: int,
    max_new_tokens: int,
    batch_size: int,
    split_seed: int,
    seed: int,
    trust_remote_code: bool,
    quiet: bool,
) -> dict[str, Any]:
    """Training-free baselines of an untuned decoder (with an optional adapter) on an sft dataset's test and
    held-out sets, first ``limit`` conversations of each: "<k>-shot" generation metrics per set for each k of
    ``shots``, and with ``pet`` PET-style classification per set ("pet")."""
    from .core.attach import load_adapter
    from .data.sft import load_sft
    from .evaluate.baselines import demonstration_pool, generation_baseline, pet_baseline
    from .models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(model_name, quiet=quiet)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=trust_remote_code)
    if adapter:
        load_adapter(model, adapter)
    data = load_sft(data_name, split_seed)
    sets = {"test": data.splits["test"], **data.extra_eval}
    sets = {name: [c for c in convs if not c.is_text][:limit] for name, convs in sets.items()}
    sets = {name: convs for name, convs in sets.items() if convs}
    pool = demonstration_pool(data)
    results: dict[str, Any] = {"model": model_name, "adapter": adapter, "data": data_name, "limit": limit}
    for k in shots:
        results[f"{k}-shot"] = {
            name: generation_baseline(model, tokenizer, convs, pool, k, max_new_tokens, batch_size, seed)
            for name, convs in sets.items()
        }
    if pet:
        scores = {name: pet_baseline(model, tokenizer, convs) for name, convs in sets.items()}
        results["pet"] = {name: r for name, r in scores.items() if r is not None}
    return results
