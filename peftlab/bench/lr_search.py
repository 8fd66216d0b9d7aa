"""A learning-rate search read back from the cells: per method (on one model and task), the validation metric at
each rate tried, averaged over the seeds that finished, and the rate chosen from it.

The choice uses validation data only: the cell's ``metrics.validation`` (the validation metrics of the state it
kept) at the group's quality metric, in that metric's direction. Test metrics take no part. Ties (means equal up to
rounding) go to the rate nearest the base rate on a log scale, then to the lower rate.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class RateResult:
    """One rate of a method's grid: the validation values of its finished cells (one per seed)."""

    lr: float
    seeds: list[int]
    values: list[float]  # the cells that recorded a validation value

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else (0.0 if self.values else None)


@dataclass
class LrSearch:
    label: str
    base: float  # the method entry's base rate (the suite's lr, else the method's own)
    metric: str
    higher_is_better: bool
    rates: list[RateResult]  # in rising order
    chosen: float

    def factor(self, lr: float) -> float:
        """``lr`` over the base rate, rounded to 12 digits (0.1, not 0.10000000000000002)."""
        return float(f"{lr / self.base:.12g}")


def base_rate(cell: dict) -> float:
    """The base rate of the cell's method: recorded by a grid's cell at another rate, else the cell's own rate."""
    return cell.get("lr_base", cell["lr"])


def validation_value(cell: dict) -> float | None:
    """The cell's validation value of its quality metric (None where it recorded none)."""
    validation = (cell.get("metrics") or {}).get("validation") or {}
    value = validation.get(cell["quality"]["metric"])
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def choose_rate(means: dict[float, float | None], base: float, higher_is_better: bool) -> float:
    """The rate with the best mean (None: no validation value); ties and an all-None grid go to the rate nearest
    ``base`` on a log scale, then to the lower one."""
    scored = {lr: m for lr, m in means.items() if m is not None}
    candidates = list(means)
    if scored:
        best = max(scored.values()) if higher_is_better else min(scored.values())
        candidates = [lr for lr, m in scored.items() if math.isclose(m, best, rel_tol=1e-9, abs_tol=1e-12)]
    return min(candidates, key=lambda lr: (abs(math.log(lr / base)), lr))


def search_rates(label: str, cells: list[dict]) -> LrSearch | None:
    """The search over one method's finished cells (peftlab's, every rate and seed); None when they hold no grid
    (no cell at a rate other than the base rate)."""
    if not any("lr_base" in c for c in cells):
        return None
    by_rate: dict[float, RateResult] = {}
    for c in sorted(cells, key=lambda c: (c["lr"], c.get("seed", 0))):
        rate = by_rate.setdefault(c["lr"], RateResult(c["lr"], [], []))
        rate.seeds.append(c.get("seed"))
        value = validation_value(c)
        if value is not None:
            rate.values.append(value)
    base = base_rate(next(c for c in cells if "lr_base" in c))
    quality = cells[0]["quality"]
    higher = quality["higher_is_better"]
    chosen = choose_rate({lr: r.mean for lr, r in by_rate.items()}, base, higher)
    return LrSearch(label, base, quality["metric"], higher, list(by_rate.values()), chosen)
