"""The sequence-labelling task: cross-entropy over each word's first sub-word; evaluation reads the predicted tag of
every word and scores entities as conlleval does (micro precision, recall, F1; token accuracy beside them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import progress
from ..data.tagging import TagEncoded, entity_scores
from .distributed import SINGLE, Distributed


class TaggingTask:
    metric = "f1"

    def __init__(self, labels: list[str]):
        self.labels = labels

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, C)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def evaluate(self, model, data: TagEncoded, batch_size: int, device, autocast, dist: Distributed = SINGLE) -> dict:
        was_training = model.training
        model.eval()
        order = sorted(dist.shard(list(range(len(data)))), key=lambda i: len(data.input_ids[i]))
        predicted: dict[int, list[str]] = {}
        total_loss, count = 0.0, 0
        with progress.track(len(order)) as advance:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = data.batch(idx, device)
                with autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                mask = batch["labels"] != -100
                total_loss += F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum").item()
                count += int(mask.sum())
                best = logits.argmax(-1).tolist()
                for row, i in enumerate(idx):
                    tags = [self.labels[best[row][p]] for p in data.first_subword[i]]
                    tags += ["O"] * (len(data.words[i]) - len(tags))  # words cut by truncation count as O
                    predicted[i] = tags
                advance(len(idx))
        model.train(was_training)
        parts = dist.gather((predicted, total_loss, count))  # every process's share, on every process
        predicted = {i: tags for part, _, _ in parts for i, tags in part.items()}
        total_loss, count = sum(p[1] for p in parts), sum(p[2] for p in parts)
        gold = [[self.labels[t] for t in words] for words in data.words]
        ordered = [predicted[i] for i in range(len(data))]
        return entity_scores(gold, ordered) | {"loss": total_loss / max(count, 1)}
