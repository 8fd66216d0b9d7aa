"""The package's layers import one way: every import inside peftlab goes to a lower layer (or stays in its own part).

Read from the source with ``ast`` (module-level and function-level imports alike), so a lazy import inside a
function that crosses a layer upward fails too.
"""

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import peftlab

ROOT = Path(peftlab.__file__).parent

# Each part of the package (a subpackage or a top-level module) and its layer; a part may import only parts of a
# lower layer. core -> methods -> train -> run -> bench / compose -> cli, on top of the leaves the core needs.
LAYERS = {
    "version": 0,
    "errors": 0,
    "fileio": 1,
    "process": 1,
    "progress": 1,
    "assets": 2,
    "core": 3,
    "quant": 4,
    "models": 4,
    "data": 4,
    "evaluate": 5,
    "methods": 6,
    "train": 7,
    "run": 8,
    "report": 9,
    "decode": 9,
    "estimate": 9,
    "bench": 10,
    "compose": 10,
    "cli": 11,
    "launch": 12,
    "__main__": 12,
}


def part_of(module: str) -> str:
    """``peftlab.core.attach`` -> ``core``; ``peftlab.run`` -> ``run``; ``peftlab`` -> ``peftlab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(path: Path) -> list[tuple[str, int]]:
    """The peftlab modules ``path`` imports, absolute, with the line of each import."""
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # "from . import x": x is a module of the package
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return [(t, line) for t, line in found if t == "peftlab" or t.startswith("peftlab.")]


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or p.is_dir()}
    parts -= {"__init__", "__pycache__"}
    assert parts - set(LAYERS) == set(), "give the new part a layer in LAYERS"


def test_imports_go_one_way():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        here = part_of(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if here in ("peftlab", "__init__"):  # the package's own __init__ re-exports the public API
            continue
        for target, line in imports_of(path):
            there = part_of(target)
            if there == here:
                continue
            if there == "peftlab" or LAYERS[there] >= LAYERS[here]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert upward == []


def test_core_imports_no_method_and_no_training_code():
    """The issue's rule, spelled out: core is a leaf below the methods and the trainer."""
    for path in (ROOT / "core").rglob("*.py"):
        for target, line in imports_of(path):
            assert part_of(target) not in ("methods", "train", "run", "peftlab"), f"{path.name}:{line} {target}"


def test_every_convertible_method_owns_its_peft_converter():
    """hf_peft only dispatches: each method's PEFT conversion lives in its own file."""
    for method in peftlab.all_methods():
        if method.peft is not None:
            assert method.peft.export.__module__.startswith("peftlab.methods."), method.name
            if method.peft.load is not None:
                assert method.peft.load.__module__.startswith("peftlab.methods."), method.name
    lora = peftlab.get_method("lora").peft
    assert lora.export.__module__ == lora.load.__module__ == "peftlab.methods.lora"


def test_version_matches_the_project_file():
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert peftlab.__version__ == project["project"]["version"]
