"""The report's tables and standings, and the formatting of their numbers."""

from __future__ import annotations

from ..report import human_bytes
from .collect import Group, Row, memory_of, ratio, step_ratio, step_times


def fmt_quality(mean: float | None, std: float | None, metric: str) -> str:
    if mean is None:
        return "-"
    if metric in ("accuracy", "f1", "precision", "recall", "answer_accuracy", "exact_match"):
        return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"
    return f"{mean:.3f} ± {std or 0:.3f}"


def model_parameters(r: Row) -> float | None:
    """The parameters of the model the method adapts (the pretrained model with its task head, without what the
    method adds): what "% of model" divides by, so a method that adds as many parameters as it adapts (diff
    pruning's difference vector and gates) shows 200 %."""
    return r.mean("params", "base") or r.mean("params", "total")


def fmt_share(n: float | None, of: float | None) -> str:
    return f"{100 * n / of:.3g}%" if n and of else "-"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{2 if n / size < 10 else 1}f}{unit}"
    return f"{n:.0f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}" if n >= 2**20 * 10 else f"{n / 2**20:.1f}"


def paired_delta(ours: Row, peer: Row | None, metric: str) -> str:
    """Ours minus PEFT's quality over the seeds both ran (the peer retraces our cell of the same seed)."""
    if peer is None:
        return "-"
    common = {c.get("seed") for c in ours.cells} & {c.get("seed") for c in peer.cells}
    return quality_delta(ours.on_seeds(common), peer.on_seeds(common), metric)


def quality_delta(a: Row | None, b: Row | None, metric: str) -> str:
    if a is None or b is None or a.mean("quality", "value") is None or b.mean("quality", "value") is None:
        return "-"
    d = a.mean("quality", "value") - b.mean("quality", "value")
    return f"{100 * d:+.1f} pts" if metric not in ("loss", "perplexity") else f"{d:+.3f}"


def forgetting_corpora(group: Group) -> list[str]:
    """The general-text corpora whose perplexity the group's runs measured before and after tuning."""
    names = {name for r in group.ours() for c in r.cells for name in (c.get("forgetting") or {})}
    return sorted(names)


def fmt_forgetting(row: Row, corpus: str) -> str:
    """Perplexity before -> after tuning, and the relative change (mean over seeds): '33.6 -> 34.6 (+3.0%)'."""
    before, after = row.mean("forgetting", corpus, "before"), row.mean("forgetting", corpus, "after")
    if before is None or after is None:
        return "-"
    return f"{before:.1f} → {after:.1f} ({100 * (after / before - 1):+.1f}%)"


def generation_metric(group: Group) -> str | None:
    """The metric of generated replies shown beside the test metric (decoders: answer accuracy), if the runs have it."""
    return "answer_accuracy" if any(r.values("metrics", "test", "answer_accuracy") for r in group.ours()) else None


def method_table(group: Group) -> tuple[list[str], list[list[str]]]:
    has_rank = any(r.first.get("params", {}).get("delta_rank") for r in group.ours())
    corpora = forgetting_corpora(group)
    extra_metric = generation_metric(group)
    header = ["method", f"{group.metric} (n)"]
    header += [extra_metric.replace("_", " ")] if extra_metric else []
    header += ["trainable", "% of model", "changed"]
    header += ["Δ rank"] if has_rank else []
    header += ["adapter", "memory MiB W / G / O / A", "step ms", "× floor", "× full", "train s", "ex/s", "tok/s", "lr"]
    header += [f"forgetting: {name} ppl" for name in corpora]
    rows = []
    for r in group.ours():
        t = step_times(group, r.label)
        m = memory_of(group, r.label, "ours")
        trainable, model = r.mean("params", "trainable"), model_parameters(r)
        row = [
            f"**{r.label}**",
            f"{fmt_quality(r.mean('quality', 'value'), r.std('quality', 'value'), group.metric)} ({r.seeds})",
        ]
        if extra_metric:
            row.append(
                fmt_quality(
                    r.mean("metrics", "test", extra_metric), r.std("metrics", "test", extra_metric), extra_metric
                )
            )
        row += [fmt_count(trainable), fmt_share(trainable, model)]
        changed = r.mean("params", "changed")
        row.append(f"{fmt_count(changed)} ({fmt_share(changed, model)})" if changed and model else fmt_count(changed))
        if has_rank:
            rank = r.first.get("params", {}).get("delta_rank") or {}
            row.append(
                "-" if not rank else f"{rank['min']}" if rank["min"] == rank["max"] else f"{rank['min']}-{rank['max']}"
            )
        row.append(human_bytes(r.mean("adapter_bytes")) if r.mean("adapter_bytes") is not None else "-")
        row.append(
            " / ".join(
                fmt_mb(m.get(k, 0) + (m.get("method_state", 0) if k == "optimizer" else 0))
                for k in ("weights", "gradients", "optimizer", "activations")
            )
            if m
            else "-"
        )
        row += [
            f"{1000 * t['ours']:.0f}" if t["ours"] else "-",
            fmt_ratio(step_ratio(group, r.label, "ours", "floor")),
            fmt_ratio(step_ratio(group, r.label, "ours", "full")),
            f"{r.mean('train_seconds'):.0f}" if r.mean("train_seconds") is not None else "-",
            f"{r.mean('examples_per_second'):.1f}" if r.mean("examples_per_second") is not None else "-",
            f"{r.mean('tokens_per_second'):.0f}" if r.mean("tokens_per_second") is not None else "-",
            f"{r.first['lr']:g}" if r.first.get("lr") is not None else "-",
        ]
        row += [fmt_forgetting(r, name) for name in corpora]
        rows.append(row)
    return header, rows


def peer_table(group: Group) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "step ours / peft",
        "memory ours / peft",
        f"{group.metric}: ours − peft (same seeds)",
        "trainable ours / peft",
        "step ms ours / peft",
        "adapter ours / peft",
    ]
    rows = []
    for r in group.ours():
        p = group.peer(r.label)
        t = step_times(group, r.label)
        mo, mp = memory_of(group, r.label, "ours"), memory_of(group, r.label, "peer")
        if p is None and not t["peer"]:
            continue
        trainable = (r.mean("params", "trainable"), p.mean("params", "trainable") if p else None)
        row = [
            f"**{r.label}**",
            fmt_ratio(step_ratio(group, r.label, "ours", "peer")),
            fmt_ratio(ratio(mo and mo["total"], mp and mp["total"])),
            paired_delta(r, p, group.metric),
            f"{fmt_count(trainable[0])} / {fmt_count(trainable[1])}"
            + (" (differ)" if trainable[1] and trainable[0] != trainable[1] else ""),
            f"{1000 * t['ours']:.0f} / {1000 * t['peer']:.0f}" if t["ours"] and t["peer"] else "-",
            f"{human_bytes(r.mean('adapter_bytes'))} / {human_bytes(p.mean('adapter_bytes'))}"
            if p and p.mean("adapter_bytes") and r.mean("adapter_bytes")
            else "-",
        ]
        rows.append(row)
    return header, rows


def standings(group: Group) -> list[str]:
    """One line per method: quality against full fine-tuning, cost against full and the floor, and against PEFT."""
    lines = []
    full = group.row("full")
    full_t = None
    extra_metric, corpora = generation_metric(group), forgetting_corpora(group)
    for r in group.ours():
        t = step_times(group, r.label)
        full_t = full_t or t["full"]
        q = r.mean("quality", "value")
        if q is None:
            continue
        parts = [f"{group.metric} {fmt_quality(q, r.std('quality', 'value'), group.metric)}"]
        if full is not None and r is not full:
            parts.append(f"{quality_delta(r, full, group.metric)} vs full")
        if extra_metric and r.values("metrics", "test", extra_metric):
            extra = r.mean("metrics", "test", extra_metric), r.std("metrics", "test", extra_metric)
            parts.append(f"{extra_metric.replace('_', ' ')} {fmt_quality(*extra, extra_metric)}")
        trainable, model = r.mean("params", "trainable"), model_parameters(r)
        if trainable and model:
            parts.append(f"{fmt_share(trainable, model)} trainable")
        parts += [f"{name} perplexity {fmt_forgetting(r, name)}" for name in corpora]
        if t["ours"] and t["floor"]:
            parts.append(
                f"step {step_ratio(group, r.label, 'ours', 'floor'):.2f}× floor"
                + (f", {step_ratio(group, r.label, 'ours', 'full'):.2f}× full" if t["full"] else "")
            )
        p = group.peer(r.label)
        if t["peer"] or p:
            mo, mp = memory_of(group, r.label, "ours"), memory_of(group, r.label, "peer")
            versus = []
            if t["ours"] and t["peer"]:
                versus.append(f"step {step_ratio(group, r.label, 'ours', 'peer'):.2f}×")
            if mo and mp:
                versus.append(f"memory {mo['total'] / mp['total']:.2f}×")
            if p:
                versus.append(f"{group.metric} {paired_delta(r, p, group.metric)}")
            parts.append("vs PEFT: " + ", ".join(versus))
        lines.append(f"**{r.label}**: " + "; ".join(parts))
    return lines


def lr_search_table(group: Group) -> tuple[list[str], list[list[str]]]:
    """One row per method that searched its learning rate: the mean validation metric (± sd, seeds) at each factor
    of its base rate, the chosen one in bold."""
    factors = sorted({s.factor(r.lr) for s in group.lr_search.values() for r in s.rates})
    header = ["method", "base lr", *[f"× {f:g}" for f in factors], "chosen lr"]
    rows = []
    for label, search in group.lr_search.items():
        by_factor = {search.factor(r.lr): r for r in search.rates}
        row = [f"**{label}**", f"{search.base:g}"]
        for f in factors:
            rate = by_factor.get(f)
            text = "-" if rate is None else f"{fmt_quality(rate.mean, rate.std, search.metric)} ({len(rate.values)})"
            row.append(f"**{text}**" if rate is not None and rate.lr == search.chosen else text)
        row.append(f"**{search.chosen:g}** (× {search.factor(search.chosen):g})")
        rows.append(row)
    return header, rows
