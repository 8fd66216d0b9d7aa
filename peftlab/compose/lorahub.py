"""LoRAHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
arXiv:2307.13269): learn the weights of a combination of trained LoRA modules from a few examples of a new task,
without gradients.

For N modules the combined update of every adapted layer is the weighted sum of the modules' updates (the paper's
``m = sum_i w_i m_i``, applied to A and B separately; we sum the products instead, ``sum_i w_i B_i A_i``, the same
linear merge that ``compose merge`` writes, which the paper's element-wise sum of factors only approximates)::

    h = W0 x + sum_i w_i s_i B_i A_i x

and the weights minimise the few-shot loss plus an L1 penalty, ``L(w) + alpha * sum_i |w_i|``, searched by a
gradient-free optimiser within ``[-1.5, 1.5]`` (the paper: nevergrad's NGOpt from ``w = 0``, 40 steps, alpha =
0.05). nevergrad is not a dependency here; the search is a small (1+1) evolution strategy with the 1/5th success
rule (Rechenberg; Kern et al. 2004), seeded and deterministic. It starts from the best of ``w = 0`` and each single
module ``w = e_i`` on the few-shot objective (N + 1 of the budget's evaluations): from 0 alone, with k = 32 and 40
evaluations, the search ran to the bounds and lost to zero-shot and to the best single module on two targets of
two (docs/results.md, issue 21's note).

Heads: the paper composes generative models, whose output layer is shared. Our encoders' modules were trained with
task heads of other label sets, so LoRAHub here combines the LoRA *bodies* only and the target task's head is fitted
on the same k examples: a ridge-regression classifier on the features the model's head would receive (one-hot
targets, closed form). The loss ``L(w)`` that the search minimises is that ridge head's *leave-one-out* squared error
on the k examples (exact in closed form: ``e_i = (y_i - yhat_i) / (1 - H_ii)``), so a fitted head cannot hide a bad
body by memorising the k examples. The baselines use the same protocol: zero-shot is ``w = 0`` (the base body with a
ridge head on the k examples), a single module is ``w = e_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import replace_module
from ..core.adapter_file import task_head_names
from ..errors import InputError
from .library import LoraModule, check_model


class WeightedLoraLinear(nn.Module):
    """``base(x) + sum_i w_i up_i down_i x`` with the modules' factors concatenated along the rank."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, owner: torch.Tensor, hub: LoraHub):
        super().__init__()
        self.base = base
        self.hub = [hub]  # a list, so the hub is not registered as a submodule
        self.register_buffer("down", down.to(base.weight.dtype))  # (sum r, in)
        self.register_buffer("up", up.to(base.weight.dtype))  # (out, sum r)
        self.register_buffer("owner", owner)  # (sum r,) the module each rank component belongs to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.hub[0].weights.to(x.dtype)[self.owner]  # (sum r,)
        return self.base(x) + F.linear(F.linear(x, self.down) * weights, self.up)  # (..., out)


class LoraHub:
    """A model carrying N LoRA modules with combination weights ``weights`` (N,), and the head's input features."""

    def __init__(self, model: nn.Module, modules: Sequence[LoraModule]):
        check_model(model, modules)
        heads = task_head_names(model)
        if not heads:
            raise InputError("model: LoRAHub fits a new task head and needs a task model (classifier, score)")
        self.model = model.eval()
        self.modules = list(modules)
        self.weights = torch.zeros(len(modules))
        for name in dict.fromkeys(t for m in modules for t in m.factors):
            owned = [(i, m.factors[name]) for i, m in enumerate(modules) if name in m.factors]
            down = torch.cat([d for _, (d, _) in owned])  # (sum r, in)
            up = torch.cat([u for _, (_, u) in owned], dim=1)  # (out, sum r)
            owner = torch.cat([torch.full((d.shape[0],), i) for i, (d, _) in owned])
            replace_module(model, name, WeightedLoraLinear(model.get_submodule(name), down, up, owner, self))
        self._captured: list[torch.Tensor] = []
        model.get_submodule(heads[0]).register_forward_hook(lambda _m, args, _out: self._captured.append(args[0]))

    @torch.no_grad()
    def features(self, encoded, indices: Sequence[int], batch_size: int = 64) -> torch.Tensor:
        """What the task head receives for the examples ``indices`` of ``encoded``, (n, d)."""
        out = []
        for start in range(0, len(indices), batch_size):
            batch = encoded.batch(indices[start : start + batch_size])
            batch.pop("labels")
            self._captured.clear()
            self.model(**batch)
            out.append(self._captured[-1].reshape(len(batch["input_ids"]), -1).float())
        return torch.cat(out)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def one_hot(labels: Sequence[int], classes: int) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(list(labels)), classes).double()


def ridge_loo_error(features: torch.Tensor, labels: Sequence[int], classes: int, ridge: float) -> float:
    """Leave-one-out mean squared error of a ridge classifier (with intercept) on one-hot targets, closed form:
    ``H = K (K + lambda I)^-1`` with ``K = X X^T + 1``, ``e_i = (y_i - (H y)_i) / (1 - H_ii)``."""
    (x,) = standardise(features.double())
    kernel = x @ x.T + 1.0  # (k, k); + 1: the intercept
    lam = ridge * kernel.diagonal().mean()
    hat = kernel @ torch.linalg.inv(kernel + lam * torch.eye(len(x), dtype=x.dtype))  # (k, k)
    y = one_hot(labels, classes)
    residual = (y - hat @ y) / (1 - hat.diagonal())[:, None]
    return float((residual**2).sum(1).mean())


def ridge_predict(
    features: torch.Tensor, labels: Sequence[int], classes: int, test: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The ridge classifier fitted on ``features`` predicts the classes of ``test`` (n,)."""
    x, t = standardise(features.double(), test.double())
    kernel = x @ x.T + 1.0
    lam = ridge * kernel.diagonal().mean()
    dual = torch.linalg.solve(kernel + lam * torch.eye(len(x), dtype=x.dtype), one_hot(labels, classes))  # (k, C)
    return ((t @ x.T + 1.0) @ dual).argmax(1)


@dataclass
class SearchResult:
    weights: list[float]
    objective: float
    history: list[float] = field(default_factory=list)  # best objective after each evaluation


def one_plus_one_es(
    objective: Callable[[np.ndarray], float],
    dims: int,
    budget: int,
    bound: float = 1.5,
    seed: int = 0,
    starts: Sequence[np.ndarray] = (),
) -> SearchResult:
    """Minimise ``objective`` over ``[-bound, bound]^dims`` with a (1+1)-ES: a Gaussian step of size sigma, kept
    when it is no worse; sigma grows by exp(1/3) on success and shrinks by exp(-1/12) on failure (about a 1/5th
    success rate keeps it steady). It starts from the best of 0 and ``starts`` (each costs one evaluation of the
    budget), so the result is never worse on the objective than any of them."""
    rng = np.random.default_rng(seed)
    best = np.zeros(dims)
    best_value = objective(best)
    history = [best_value]
    for start in starts:
        value = objective(np.asarray(start, dtype=float))
        if value < best_value:
            best, best_value = np.asarray(start, dtype=float), value
        history.append(best_value)
    sigma = bound / 3
    for _ in range(budget - len(history)):
        candidate = np.clip(best + sigma * rng.standard_normal(dims), -bound, bound)
        value = objective(candidate)
        if value <= best_value:
            best, best_value, sigma = candidate, value, sigma * np.exp(1 / 3)
        else:
            sigma *= np.exp(-1 / 12)
        history.append(best_value)
    return SearchResult(best.tolist(), best_value, history)


def search(
    hub: LoraHub,
    encoded,
    indices: Sequence[int],
    classes: int,
    budget: int = 40,
    l1: float = 0.05,
    ridge: float = 0.1,
    seed: int = 0,
) -> SearchResult:
    """LoRAHub's weights for the k examples ``indices`` of ``encoded``: minimise the ridge head's leave-one-out
    error plus ``l1 * |w|_1``, from the best of zero-shot and the single modules (when the budget leaves room for
    a search after them)."""
    labels = [encoded.labels[i] for i in indices]

    def objective(w: np.ndarray) -> float:
        hub.weights = torch.as_tensor(w, dtype=torch.float32)
        return ridge_loo_error(hub.features(encoded, indices), labels, classes, ridge) + l1 * float(np.abs(w).sum())

    n = len(hub.modules)
    singles = list(np.eye(n)) if budget > n + 1 else []
    result = one_plus_one_es(objective, n, budget, seed=seed, starts=singles)
    hub.weights = torch.as_tensor(result.weights, dtype=torch.float32)
    return result


def accuracy(
    hub: LoraHub,
    weights: Sequence[float],
    train,
    indices: Sequence[int],
    test,
    test_indices,
    classes: int,
    ridge: float = 0.1,
    cache: dict | None = None,
) -> float:
    """Test accuracy with the bodies combined by ``weights`` and a ridge head fitted on the k examples (``cache``
    keeps the test features of weights seen before)."""
    hub.weights = torch.as_tensor(list(weights), dtype=torch.float32)
    key = tuple(float(w) for w in weights)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = hub.features(test, test_indices)
    predicted = ridge_predict(
        hub.features(train, indices), [train.labels[i] for i in indices], classes, cache[key], ridge
    )
    truth = torch.as_tensor([test.labels[i] for i in test_indices])
    return float((predicted == truth).double().mean())


def compare(
    paths: Sequence[str],
    data: str,
    model: str = "minilm",
    k: int = 32,
    budget: int = 40,
    l1: float = 0.05,
    ridge: float = 0.1,
    seeds: Sequence[int] = (0,),
    test_limit: int | None = 1000,
    max_length: int = 128,
    quiet: bool = True,
) -> dict:
    """LoRAHub on a target task against zero-shot and each single module, all with a ridge head on the same k
    training examples (drawn per seed) and scored on the same test examples (the first ``test_limit``)."""
    from ..run import RunOptions, build_model, prepare_data
    from .library import read_library

    modules = read_library(paths)
    options = RunOptions(model=model, data=data, max_length=max_length)
    prepared = prepare_data(options, quiet=quiet)
    train, test = prepared.splits["train"], prepared.splits["test"]
    classes = len(prepared.labels)
    if not 2 <= k <= len(train):
        raise InputError(f"k: expected 2..{len(train)} examples of {data!r}, got {k}")
    hub = LoraHub(build_model(options, prepared, 0), modules)
    test_indices = list(range(min(len(test), test_limit or len(test))))
    names = [m.name for m in modules]
    rows: dict[str, list[float]] = {"zero-shot": [], **{f"single:{n}": [] for n in names}, "lorahub": []}
    found, cache = [], {}
    for seed in seeds:
        indices = np.random.default_rng(seed).choice(len(train), size=k, replace=False).tolist()
        result = search(hub, train, indices, classes, budget, l1, ridge, seed)
        found.append(
            {"seed": seed, "weights": dict(zip(names, result.weights, strict=True)), "objective": result.objective}
        )
        settings = {"zero-shot": [0.0] * len(names), "lorahub": result.weights}
        settings |= {f"single:{n}": [float(i == j) for j in range(len(names))] for i, n in enumerate(names)}
        for key, weights in settings.items():
            rows[key].append(accuracy(hub, weights, train, indices, test, test_indices, classes, ridge, cache))
    singles = {key: float(np.mean(v)) for key, v in rows.items() if key.startswith("single:")}
    return {
        "target": data,
        "modules": {m.name: str(m.folder) for m in modules},
        "k": k,
        "budget": budget,
        "l1": l1,
        "ridge": ridge,
        "seeds": list(seeds),
        "test_examples": len(test_indices),
        "accuracy": {key: {"mean": float(np.mean(v)), "per_seed": v} for key, v in rows.items()},
        "best_single": max(singles, key=singles.get) if singles else None,
        "searches": found,
    }
