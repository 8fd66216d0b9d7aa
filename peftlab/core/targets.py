"""Choosing the layers a method adapts: by layer type, then by one glob rule over module names.

The rule: a pattern selects a module when ``fnmatch`` matches it against the module's full dotted name *or*
against any trailing part of that name that starts after a dot. So for ``bert.encoder.layer.0.attention.self.query``
the patterns ``query``, ``self.query``, ``layer.0.*.query`` and ``*.query`` all match, while ``uery`` does not.
Matching is case-sensitive. Only modules of the method's layer types (``nn.Linear`` for LoRA) are adapted.

Two special patterns: ``all-linear`` selects every ``nn.Linear`` except the task head and the output embedding
(an LM head), and an exact module name selects just that module.

A pattern that selects nothing is an error naming the closest module names, so a misspelt target never passes
silently.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from ..errors import InputError

ALL_LINEAR = "all-linear"


def matches(pattern: str, name: str) -> bool:
    """The glob rule above: the full name or a dot-bounded suffix of it matches ``pattern``."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def find_targets(
    model: nn.Module,
    patterns: Sequence[str],
    layer_types: tuple[type, ...],
    protected: Sequence[str] = (),
) -> list[str]:
    """Names of the modules of ``layer_types`` selected by ``patterns``, in model order.

    ``protected`` modules (the task head and everything inside it) are never selected. Raises InputError for a
    pattern that selects nothing, naming the closest module names, or one that selects only layers of other types.
    """
    if not patterns:
        raise InputError("targets: expected at least one module name pattern, got none")
    modules = dict(model.named_modules())
    excluded = set(_inside(modules, protected))
    output_embedding = _output_embedding_name(model)
    selected: list[str] = []
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = [
                n
                for n, m in modules.items()
                if isinstance(m, nn.Linear) and n not in excluded and n != output_embedding
            ]
            if not hits:
                raise InputError("targets: 'all-linear' found no nn.Linear layer outside the task head")
        else:
            named = [n for n in modules if n and matches(pattern, n) and n not in excluded]
            hits = [n for n in named if isinstance(modules[n], layer_types)]
            if not named:
                raise InputError(f"targets: pattern {pattern!r} matches no module{_closest(pattern, modules)}")
            if not hits:
                found = sorted({type(modules[n]).__name__ for n in named})
                wanted = ", ".join(t.__name__ for t in layer_types)
                raise InputError(
                    f"targets: pattern {pattern!r} matches only {', '.join(found)} modules "
                    f"(e.g. {named[0]!r}); this method adapts {wanted} layers"
                )
        selected.extend(h for h in hits if h not in selected)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(selected, key=order.__getitem__)


def _inside(modules: dict[str, nn.Module], roots: Sequence[str]) -> list[str]:
    return [n for n in modules for r in roots if n == r or n.startswith(r + ".")]


def _output_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def _closest(pattern: str, modules: dict[str, nn.Module]) -> str:
    """ "; closest module names: a, b, c" from full names and their dot-bounded suffixes."""
    candidates: dict[str, str] = {}
    for name in modules:
        parts = name.split(".")
        for i in range(len(parts)):
            candidates.setdefault(".".join(parts[i:]), name)
    close = difflib.get_close_matches(pattern, list(candidates), n=5, cutoff=0.5)
    if not close:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if n and not n.rsplit(".", 1)[-1].isdigit()})
        return "; module names include: " + ", ".join(leaves[:12])
    shown = []
    for c in close:
        full = candidates[c]
        shown.append(c if c == full else f"{c} (e.g. {full})")
    return "; closest module names: " + ", ".join(shown)
