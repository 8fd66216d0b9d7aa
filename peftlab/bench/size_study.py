"""The model-size study: how much of a model must train to come close to full fine-tuning, per model size.

Where a report holds one task on two or more models, each with a full fine-tuning row, every method's quality is
put against its *trainable share* of the model (trainable parameters / all parameters, the task head included),
relative to full fine-tuning on the same model::

    relative = quality / full quality          (higher is better: accuracy, F1)
    relative = full quality / quality          (lower is better: loss)

and per model the smallest trainable share whose relative quality reaches ``TARGET`` (95 %) is reported, in share and
in number: the seeds' claim to check is that larger models need fewer updated parameters, in both. The same is
reported without the task head (``head_size``), whose size depends on the architecture rather than on the model's
size and would otherwise dominate the small methods' counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .collect import Group

TARGET = 0.95


@dataclass
class SizePoint:
    label: str
    trainable: float
    share: float  # trainable / total
    quality: float
    relative: float  # quality relative to full fine-tuning on the same model (1 = as good)
    body_trainable: float | None = None  # trainable without the task head (None: the head's size is not known)
    body_share: float | None = None  # body_trainable / the parameters outside the head


@dataclass
class ModelSize:
    """One model on one task: its size, full fine-tuning's quality, every method's point."""

    model: str
    total: float
    full_quality: float
    points: list[SizePoint] = field(default_factory=list)

    head: float | None = None  # the task head's parameters, where the rows tell (see ``head_size``)

    def smallest_reaching(self, target: float = TARGET, body: bool = False) -> SizePoint | None:
        """The method with the smallest trainable share whose relative quality is at least ``target``; with
        ``body``, the smallest share without the task head."""
        reaching = [p for p in self.points if p.relative >= target and (not body or p.body_share is not None)]
        return min(reaching, key=lambda p: p.body_share if body else p.share) if reaching else None


@dataclass
class SizeStudy:
    suite: str
    task: str
    metric: str
    higher_is_better: bool
    models: list[ModelSize]  # smallest model first


def relative_quality(quality: float, full: float, higher_is_better: bool) -> float:
    if higher_is_better:
        return quality / full if full else float("nan")
    return full / quality if quality else float("nan")


def full_row(group: Group):
    return group.row("full") or next((r for r in group.ours() if r.method == "full"), None)


def model_size(group: Group) -> ModelSize | None:
    """The group's points, or None without a finished full fine-tuning row to compare with."""
    full = full_row(group)
    full_quality = full.mean("quality", "value") if full else None
    total = full.mean("params", "total") if full else None
    if full_quality is None or not total:
        return None
    head = head_size(group)
    size = ModelSize(group.model, total, full_quality, head=head)
    for row in group.ours():
        quality, trainable = row.mean("quality", "value"), row.mean("params", "trainable")
        if row is full or quality is None or not trainable:
            continue
        body = trainable - head if head is not None else None
        size.points.append(
            SizePoint(
                row.label, trainable, trainable / total, quality,
                relative_quality(quality, full_quality, group.higher_is_better),
                body, body / (total - head) if body is not None else None,
            )
        )  # fmt: skip
    size.points.sort(key=lambda p: p.share)
    return size


def head_size(group: Group) -> float | None:
    """The task head's parameters: what a method that adds parameters trains beyond them (trainable - adapter), the
    same for every such row of a group; None when no row adds parameters or the rows disagree. Heads differ by
    architecture (MiniLM's BERT head is one Linear(384, 2), MPNet's a Linear(768, 768) and a Linear(768, 2)), and
    a large head would hide how much of the body a method needs to train."""
    heads = {
        row.mean("params", "trainable") - row.mean("params", "adapter")
        for row in group.ours()
        if row.mean("params", "adapter") and row.mean("params", "trainable")
    }
    return heads.pop() if len(heads) == 1 else None


def size_studies(groups: list[Group]) -> list[SizeStudy]:
    """One study per (suite, task) run on two or more models that each have a full fine-tuning row."""
    by_task: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        by_task.setdefault((g.suite, g.task), []).append(g)
    studies = []
    for (suite, task), members in by_task.items():
        sizes = [s for s in map(model_size, members) if s is not None]
        if len(sizes) >= 2:
            first = members[0]
            sizes.sort(key=lambda s: s.total)
            studies.append(SizeStudy(suite, task, first.metric, first.higher_is_better, sizes))
    return studies


def summary_table(study: SizeStudy) -> tuple[list[str], list[list[str]]]:
    """Per model: its size, full fine-tuning's quality, and the smallest trainable share reaching the target."""
    header = ["model", "parameters", "task head", f"full ({study.metric})", f"smallest share ≥ {TARGET:.0%} of full",
              "method", "the same without the head", "method"]  # fmt: skip
    rows = []
    for size in study.models:
        best, body = size.smallest_reaching(), size.smallest_reaching(body=True)
        rows.append(
            [
                f"**{size.model}**",
                f"{size.total / 1e6:.1f}M",
                f"{size.head:,.0f}" if size.head is not None else "-",
                f"{size.full_quality:.4g}",
                f"{best.share:.3%} ({best.trainable:,.0f})" if best else "none reached it",
                best.label if best else "",
                f"{body.body_share:.3%} ({body.body_trainable:,.0f})" if body else "-",
                body.label if body else "",
            ]
        )
    return header, rows


def detail_table(study: SizeStudy) -> tuple[list[str], list[list[str]]]:
    """Every method's trainable share and relative quality on every model."""
    labels = sorted({p.label for s in study.models for p in s.points})
    header = ["method", *(f"{s.model}: share / relative" for s in study.models)]
    rows = []
    for label in labels:
        cells = []
        for size in study.models:
            point = next((p for p in size.points if p.label == label), None)
            cells.append(f"{point.share:.3%} / {point.relative:.1%}" if point else "")
        rows.append([f"**{label}**", *cells])
    return header, rows


def reached(size: ModelSize, body: bool = False) -> dict | None:
    best = size.smallest_reaching(body=body)
    if best is None:
        return None
    if body:
        return {"label": best.label, "share": best.body_share, "trainable": best.body_trainable}
    return {"label": best.label, "share": best.share, "trainable": best.trainable}


def summary(study: SizeStudy) -> dict:
    """The study for the report's JSON."""
    return {
        "suite": study.suite,
        "task": study.task,
        "metric": study.metric,
        "target": TARGET,
        "models": [
            {
                "model": s.model,
                "parameters": s.total,
                "full_quality": s.full_quality,
                "task_head": s.head,
                "smallest_reaching_target": reached(s),
                "smallest_reaching_target_without_head": reached(s, body=True),
                "points": [p.__dict__ for p in s.points],
            }
            for s in study.models
        ],
    }
