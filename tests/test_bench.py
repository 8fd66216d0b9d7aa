"""The benchmark laboratory: suites, the measured step (time and memory split), the floor, the PEFT peer, and the
quick suite end to end (cells, resume, report)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.bench import Filters, load_suite, make_plan, packaged_suites
from peftlab.bench.collect import Group, Row
from peftlab.bench.measure import FloorStep, TrainStep, alternate, tensor_bytes
from peftlab.bench.peer import build_peer, peer_hooks, peer_note
from peftlab.bench.plots import label_offsets, pareto_front
from peftlab.bench.report import write_report
from peftlab.bench.suite import parse_suite
from peftlab.bench.summary_tables import method_table, paired_delta, standings
from peftlab.core.hooks import TrainingHooks
from peftlab.errors import InputError
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train import loop
from peftlab.train.loop import ClassificationTask, TrainSettings, epoch_order, fit
from peftlab.train.step import Step
from tests.conftest import skip_if_peft_prefix_tuning_fails_on_bert

MINIMAL = {
    "name": "t",
    "seeds": [0],
    "models": ["tiny:bert"],
    "budget": {"max_steps": 2},
    "tasks": [{"name": "s", "task": "classify", "data": "tiny:sentiment"}],
    "methods": [{"name": "lora"}],
}


def suite_with(**changes):
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return parse_suite(data, "test.toml")


# --- suites -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(packaged_suites()))
def test_packaged_suites_load_and_plan(name, tmp_path):
    suite = load_suite(name)
    plan = make_plan(suite, tmp_path)
    assert plan.variants, name
    assert all(v.lr > 0 for v in plan.variants)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bugdet": {"max_steps": 1}}, "unknown key 'bugdet' .did you mean 'budget'"),
        ({"budget": {"max_steps": 1, "epochs": 1}}, "give exactly one of max_steps"),
        ({"budget": {"max_steps": 0}}, "budget.max_steps: expected a positive integer"),
        ({"train": {"lr": 1e-3}}, "train.lr: set by the suite itself"),
        ({"train": {"batch_sise": 8}}, "unknown key 'batch_sise' .did you mean 'batch_size'"),
        ({"seeds": [0, 0]}, "names a seed twice"),
        ({"tasks": [{"name": "s", "task": "translate", "data": "x"}]}, "expected one of classify, tag, span, sft"),
        ({"tasks": [{"name": "s", "task": "classify", "data": "x", "options": {"model": "m"}}]}, "set by each cell"),
        ({"methods": [{"name": "lora", "lr": -1}]}, "lr: expected a positive number"),
        ({"methods": [{"name": "lora"}, {"name": "lora"}]}, "two entries are labelled 'lora'"),
        ({"speed": {"references": ["ceiling"]}}, "speed.references"),
        ({"threads": 0}, "threads: expected a positive integer"),
    ],
)
def test_suite_errors_name_the_key(changes, message):
    with pytest.raises(InputError, match=message):
        suite_with(**changes)


def test_method_options_are_checked_by_the_method(tmp_path):
    suite = suite_with(methods=[{"name": "lora", "options": {"rank": 4}}])
    with pytest.raises(InputError, match=r"methods\[lora\].options: unknown option 'rank'"):
        make_plan(suite, tmp_path)


def test_unregistered_methods_and_missing_models_are_skipped_with_a_note(tmp_path):
    suite = suite_with(
        models=["tiny:bert", "no-such-model"], methods=[{"name": "lora"}, {"name": "no_such_method", "label": "nope"}]
    )
    plan = make_plan(suite, tmp_path)
    assert [v.label for v in plan.variants] == ["lora"]
    assert any("'no_such_method'" in n and "not registered" in n for n in plan.notes)
    assert any("no-such-model" in n for n in plan.notes)
    assert {c.group.model_spec for c in plan.cells} == {"tiny:bert"}
    # lora has a PEFT peer: one peftlab cell and one peer cell per seed
    assert [c.peer for c in plan.cells] == [False, True]


def test_all_methods_adds_every_registered_method(tmp_path):
    plan = make_plan(
        suite_with(all_methods=True, methods=[{"name": "lora", "label": "rslora", "options": {"rslora": True}}]),
        tmp_path,
    )
    labels = [v.label for v in plan.variants]
    assert labels[0] == "rslora"
    # every registered method the entries do not name (by method name: rslora names lora), except those that
    # cannot run on their defaults (AdapterFusion needs its stage-one adapters), which get a note
    assert set(labels[1:]) == {m.name for m in peftlab.all_methods()} - {"lora", "adapter_fusion"}
    assert any("'adapter_fusion' needs options" in n for n in plan.notes)


def test_peers_only_where_like_for_like():
    assert peer_note("lora") is None
    assert "no 'dylora'" in peer_note("dylora")
    pissa = peftlab.get_method("lora").config(init="pissa")
    assert "rank 2r" in peer_note("lora", pissa)
    p_tuning = peftlab.get_method("p_tuning").config
    assert "PEFT puts the prompt in front" in peer_note("p_tuning", p_tuning())  # auto: after [CLS] on encoders
    assert peer_note("p_tuning", p_tuning(position="front")) is None
    assert peer_note("p_tuning", p_tuning(), task_kind="sft") is None  # auto: in front on decoders
    assert "PEFT puts the prompt in front" in peer_note("p_tuning", p_tuning(), task_kind="classify")
    prefix = peftlab.get_method("prefix_tuning").config
    assert "PEFT would train directly" in peer_note("prefix_tuning", prefix())
    assert peer_note("prefix_tuning", prefix(projection=False)) is None


def test_p_tuning_at_auto_has_a_peer_on_decoders_only(tmp_path):
    tasks = [
        {"name": "s", "task": "classify", "data": "tiny:sentiment"},
        {"name": "i", "task": "sft", "data": "tiny:instructions", "models": ["tiny:llama"]},
    ]
    plan = make_plan(suite_with(tasks=tasks, methods=[{"name": "p_tuning", "peer": True}]), tmp_path)
    cells = [(c.group.task.name, c.peer) for c in plan.cells]
    assert cells == [("s", False), ("i", False), ("i", True)]
    # asked for by name, the missing encoder peer is said once, with the reason
    peer_notes = [n for n in plan.notes if "no peer column" in n]
    assert len(peer_notes) == 1 and peer_notes[0].startswith("p_tuning: no peer column on classify tasks")
    assert "PEFT puts the prompt in front" in peer_notes[0]


# --- the measured step ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def batch_of(prepared, n=8):
    return prepared[1].splits["train"].batch(list(range(n)))


def attached(prepared, method, seed=0, **options):
    return peftlab.attach(build_model(prepared[0], prepared[1], seed), method, **options)


def step_for(attachment, settings=None, lr=1e-2):
    settings = settings or TrainSettings(batch_size=8, warmup=0, max_steps=10)
    return TrainStep(attachment, ClassificationTask(2), settings, lr, TrainingHooks(), torch.device("cpu"), 10)


def test_memory_split_counts_what_each_part_holds(prepared):
    adapter = attached(prepared, "lora", r=4)
    trainable = adapter.trainable_parameters()
    expected_weights = sum(p.numel() * 4 for p in adapter.model.parameters()) + tensor_bytes(adapter.model.buffers())
    split = step_for(adapter).memory(batch_of(prepared))
    assert split["weights"] == expected_weights
    assert split["gradients"] == sum(p.numel() * 4 for p in trainable)
    # AdamW keeps two moments per trainable entry, plus a step counter per parameter
    assert split["optimizer"] == 2 * split["gradients"] + 4 * len(trainable)
    assert split["activations"] > 0
    assert split["total"] == sum(v for k, v in split.items() if k != "total")


def test_activation_bytes_grow_with_the_batch(prepared):
    small = step_for(attached(prepared, "lora", r=4)).memory(batch_of(prepared, 4))["activations"]
    large = step_for(attached(prepared, "lora", r=4)).memory(batch_of(prepared, 16))["activations"]
    assert large > 2 * small


def test_the_floor_computes_no_weight_gradient(prepared):
    adapter = attached(prepared, "full")
    floor = FloorStep(adapter.model, ClassificationTask(2), TrainSettings(), torch.device("cpu"))
    split = floor.memory(batch_of(prepared))
    assert all(p.grad is None for p in adapter.model.parameters())
    assert all(p.requires_grad for p in adapter.model.parameters())  # restored afterwards
    assert split["gradients"] == split["optimizer"] == 0 and split["activations"] > 0
    full = step_for(adapter).memory(batch_of(prepared))
    assert full["activations"] >= split["activations"]


def test_train_step_is_the_loops_step(prepared, tmp_path, monkeypatch):
    """The benchmark's TrainStep and peftlab.train.loop.fit take their steps with the same step object
    (peftlab.train.step.Step), and one TrainStep leaves the same weights as one step of fit on the same batch."""
    options, data = prepared
    settings = TrainSettings(batch_size=8, max_steps=1, warmup=0, seed=3)
    made = []

    class Recorded(Step):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(loop, "Step", Recorded)
    ours = attached(prepared, "lora", r=4)
    fit(
        ours,
        ClassificationTask(2),
        data.splits["train"],
        data.splits["validation"],
        settings,
        1e-2,
        tmp_path / "ckpt",
        lambda m, s: None,
        torch.device("cpu"),
        show_progress=False,
    )
    assert len(made) == 1
    again = attached(prepared, "lora", r=4)
    step = TrainStep(again, ClassificationTask(2), settings, 1e-2, TrainingHooks(), torch.device("cpu"), 1)
    assert type(step.step) is Step
    step(data.splits["train"].batch(epoch_order(data.splits["train"], settings, 0)[:8]))
    for (name, a), b in zip(ours.state().items(), again.state().values(), strict=True):
        assert torch.equal(a, b), name


def test_alternate_rotates_and_takes_medians():
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    timings = alternate(steps, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t["times"]) == 3 and t["min"] <= t["median"] for t in timings.values())


# --- the PEFT peer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {"r": 4}),
        ("lora", {"r": 4, "rslora": True}),
        ("ia3", {}),
        ("dora", {"r": 4}),
        ("prompt_tuning", {"num_virtual_tokens": 4}),
        ("prefix_tuning", {"num_virtual_tokens": 4, "projection": False}),
    ],
)
def test_peer_starts_and_trains_like_ours(prepared, method, options, tmp_path):
    """Without dropout, PEFT's model trained by the same steps stays equal to ours."""
    ours = attached(prepared, method, seed=1, **options)
    peer = build_peer(ours, build_model(prepared[0], prepared[1], 1), "classify", tmp_path / "hf", 5)
    batch = batch_of(prepared)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ours.model.train()
    peer.model.train()
    with skip_if_peft_prefix_tuning_fails_on_bert():
        peer_logits = peer.model(**inputs).logits
    torch.testing.assert_close(peer_logits, ours.model(**inputs).logits, rtol=0, atol=1e-6)
    assert peer.trainable_count() == ours.trainable_count()
    ours_step, peer_step = step_for(ours), step_for(peer)
    for _ in range(3):
        ours_step(batch)
        peer_step(batch)
    torch.testing.assert_close(peer.model(**inputs).logits, ours.model(**inputs).logits, rtol=0, atol=1e-5)


def test_adalora_peer_prunes_on_peft_schedule(prepared, tmp_path):
    ours = attached(prepared, "adalora", init_r=4, target_r=2, tinit=1, tfinal=1, delta_t=1)
    peer = build_peer(ours, build_model(prepared[0], prepared[1], 0), "classify", tmp_path / "hf", 6)
    hooks = peer_hooks(peer)
    assert hooks.penalty() is not None
    step = TrainStep(peer, ClassificationTask(2), TrainSettings(warmup=0), 1e-2, hooks, torch.device("cpu"), 6)
    for _ in range(6):
        step(batch_of(prepared))
    kept = [int((p != 0).sum()) for n, p in peer.model.named_parameters() if "lora_E" in n]
    assert sum(kept) == 2 * len(kept)  # pruned to the target budget: target_r per layer on average


# --- reports ----------------------------------------------------------------------------------------------------


def test_pareto_front():
    points = [(10, 0.8, "a"), (100, 0.9, "b"), (50, 0.7, "c"), (1000, 0.85, "d"), (5, 0.8, "e")]
    assert [p[2] for p in pareto_front(points, higher_is_better=True)] == ["e", "b"]
    assert [p[2] for p in pareto_front(points, higher_is_better=False)] == ["e", "c"]


# --- the quick suite end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite (seed 0 only, to keep the test suite fast), run through the CLI once for every test below."""
    from peftlab.cli import main

    out = tmp_path_factory.mktemp("bench") / "quick"
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")  # every warning that reaches the user is recorded
        code = main(["--no-progress", "bench", "--quick", "--seeds", "0", "--out", str(out)])
    assert code == 0
    (out.parent / "console.txt").write_text(printed.getvalue())
    (out.parent / "warnings.txt").write_text("".join(f"{w.category.__name__}: {w.message}\n" for w in caught))
    return out


def cells(out: Path) -> dict[tuple[str, str, bool], dict]:
    found = {}
    for path in out.glob("*/*/seed0/**/cell.json"):
        cell = json.loads(path.read_text())
        found[(cell["task"], cell["label"], cell["peer"])] = cell
    return found


def test_quick_suite_records_every_cell(quick):
    found = cells(quick)
    suite = load_suite("quick")
    expected = {(t.name, m.label, peer) for t in suite.tasks for m in suite.methods for peer in (False, True)}
    expected -= {(t, "full", True) for t, _, _ in expected}
    assert set(found) == expected
    for (task, label, peer), cell in found.items():
        assert cell["quality"]["value"] is not None, (task, label)
        assert cell["params"]["trainable"] > 0
        assert cell["adapter_bytes"] > 0
        assert cell["train_seconds"] > 0 and cell["tokens_per_second"] > 0
        memory = cell["memory"]
        assert memory["weights"] > 0 and memory["activations"] > 0 and memory["gradients"] > 0
        assert cell["step_seconds"] > 0
        assert cell["versions"]["torch"] and cell["machine"]["cpus"]
        if not peer:
            assert cell["params"]["changed"] > 0 and cell["lr"] > 0
    # without dropout the peer retraces our run: the same quality
    for (task, label, peer), cell in found.items():
        if peer:
            ours = found[(task, label, False)]
            assert cell["quality"]["value"] == pytest.approx(ours["quality"]["value"], abs=1e-4), (task, label)
    sft = found[("instructions", "lora", False)]
    assert "answer_accuracy" in sft["metrics"]["test"]


def test_quick_suite_console_has_a_header_a_line_per_cell_and_a_summary(quick):
    printed = (quick.parent / "console.txt").read_text()
    lines = printed.splitlines()
    assert (
        lines[0] == f"bench quick: 15 cells: 15 to run, 0 done before, 0 reused, speed of 9 methods to measure; "
        f"results in {quick}"
    )
    for task, label, peer in cells(quick):
        model = "tiny:llama" if task == "instructions" else "tiny:bert"
        tag = f"[{model} / {task} / {label} / seed 0]" + (" (peer)" if peer else "")
        mine = [line for line in lines if tag in line and (peer or tag + " (peer)" not in line)]
        assert len(mine) == 2  # one line when the cell ends, and its row in the summary table
        assert mine[0].startswith(tag + " ") and ", trainable " in mine[0] and mine[0].endswith(" s")
    assert "suite quick: cells of this run" in printed
    assert "epoch " not in printed  # no per-step or per-epoch chatter
    assert "FutureWarning" not in (quick.parent / "warnings.txt").read_text()


def test_quick_suite_speed_has_the_floor_and_full(quick):
    speed = json.loads((quick / "tiny-bert__sentiment" / "speed.json").read_text())
    assert speed["batch"]["examples"] == 16
    for label in ("full", "lora", "ia3"):
        entry = speed["methods"][label]
        assert entry["floor"]["median"] > 0 and entry["full"]["median"] > 0 and entry["ours"]["median"] > 0
        assert len(entry["floor"]["times"]) == 3
    assert speed["methods"]["lora"]["peer"]["median"] > 0
    assert speed["references"]["floor"]["memory"]["gradients"] == 0


def test_quick_suite_resumes_and_rebuilds_the_report(quick, cli, tmp_path):
    code, out, _ = cli("bench", "--quick", "--seeds", "0", "--out", quick)
    assert code == 0
    assert "0 run now" in out
    (quick / "report.md").unlink()
    preface = tmp_path / "preface.md"
    preface.write_text("Read this **first**: tiny models.\n\nSecond paragraph\nover two lines.\n")
    code, out, _ = cli("bench", "--report", "--out", quick, "--report-to", tmp_path / "r", "--preface", preface)
    assert code == 0
    md = (tmp_path / "r.md").read_text()
    assert md.index("> Read this **first**: tiny models.\n\n> Second paragraph\n> over two lines.") < md.index(
        "**Suite"
    )
    assert "<blockquote><p>Read this <b>first</b>: tiny models.</p></blockquote>" in (tmp_path / "r.html").read_text()
    code, out, _ = cli("bench", "--report", "--out", quick)
    assert code == 0 and (quick / "report.md").exists()
    code, out, _ = cli("bench", "--quick", "--list", "--out", quick)
    assert code == 0 and "to run" in out and "done" in out  # seed 1 is still to run


def test_identical_cells_are_reused_from_another_bench_folder(quick, cli, tmp_path):
    code, out, _ = cli("bench", "--quick", "--seeds", "0", "--out", tmp_path / "again", "--reuse", quick)
    assert code == 0
    assert "15 reused, 0 run now" in out
    assert cells(tmp_path / "again").keys() == cells(quick).keys()
    speed = json.loads((tmp_path / "again" / "tiny-bert__ner" / "speed.json").read_text())
    assert speed == json.loads((quick / "tiny-bert__ner" / "speed.json").read_text())


def test_a_cell_is_reused_from_another_label_folder_of_its_group(quick, cli, tmp_path):
    """A learning-rate search keeps a rate that later became the method's default under ``<label>@lr<rate>``: the
    same cell (same fingerprint) is found there."""
    other = tmp_path / "other"
    shutil.copytree(quick, other)
    for group in other.glob("*__*"):
        (group / "lora").rename(group / "lora@lr0.001")
    args = ("bench", "--quick", "--seeds", "0", "--methods", "lora", "--no-peer", "--no-speed")
    code, out, _ = cli(*args, "--out", tmp_path / "again", "--reuse", other)
    assert code == 0 and "3 reused, 0 run now" in out
    for task in ("sentiment", "ner", "instructions"):
        cell = json.loads(next((tmp_path / "again").glob(f"*__{task}/lora/seed0/cell.json")).read_text())
        assert cell["reused_from"].endswith("lora@lr0.001/seed0")


def test_a_report_over_folders_that_hold_copies_of_a_cell_counts_it_once(quick, cli, tmp_path):
    """``--reuse`` copies finished cells into the new folder: a report over both folders must not count the copied
    seed twice in its means and seed lists."""
    code, _, _ = cli("bench", "--quick", "--seeds", "0", "--out", tmp_path / "again", "--reuse", quick)
    assert code == 0
    write_report([quick, tmp_path / "again"], tmp_path / "both")
    write_report([quick], tmp_path / "one")
    assert json.loads((tmp_path / "both.json").read_text()) == json.loads((tmp_path / "one.json").read_text())


def test_speed_only_measures_without_training(cli, tmp_path):
    args = ("bench", "--quick", "--tasks", "sentiment", "--methods", "lora", "--speed-only", "--out", tmp_path)
    code, out, _ = cli(*args)
    assert code == 0 and "0 run now" in out
    path = tmp_path / "tiny-bert__sentiment" / "speed.json"
    first = json.loads(path.read_text())["methods"]["lora"]
    assert not list(tmp_path.glob("*/*/seed*/cell.json"))
    code, _, _ = cli(*args, "--remeasure")
    assert code == 0
    again = json.loads(path.read_text())["methods"]["lora"]
    assert again["fingerprint"] == first["fingerprint"] and again["ours"]["times"] != first["ours"]["times"]
    md = write_report([tmp_path], tmp_path / "speed-report")[0].read_text()  # no cells: the group still reports
    section = md.split("## tiny:bert / sentiment")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| **lora** |"))
    assert "- (0)" in row and "×" in row  # no quality, its step ratios and memory split
    assert "quality.png" not in section and "memory.png" in section
    record = json.loads(path.read_text())  # a measurement that failed (a bad option, say) is tried again
    record["methods"]["lora"] = {"fingerprint": first["fingerprint"], "error": "InputError: r: expected ..."}
    path.write_text(json.dumps(record))
    code, out, _ = cli(*args)
    assert code == 0
    assert "error" not in json.loads(path.read_text())["methods"]["lora"]


def test_quick_report_has_tables_and_plots(quick):
    md = (quick / "report.md").read_text()
    assert "## Standings" in md and "Against Hugging Face PEFT" in md
    summary = json.loads((quick / "report.json").read_text())
    assert {g["task"] for g in summary} == {"sentiment", "ner", "instructions"}
    assert "| **lora** |" in md
    pngs = sorted(p.name for p in (quick / "report").glob("*.png"))
    assert len(pngs) == 9  # three groups x quality, memory, speed
    for name in pngs:
        assert f"report/{name}" in md
        assert (quick / "report" / name).stat().st_size < 200_000


def test_groups_run_on_different_machines_say_where_they_ran(quick, tmp_path):
    """A report over cells from two machines (MiniLM on the CPU, MPNet on a lent GPU, say) names each group's
    machine, since speed and memory compare only within one; a report from one machine does not repeat it."""
    bench = tmp_path / "bench"
    shutil.copytree(quick, bench)
    for path in (bench / "tiny-bert__ner").rglob("cell.json"):
        cell = json.loads(path.read_text())
        cell["machine"]["cuda"] = "NVIDIA H100 80GB HBM3"
        path.write_text(json.dumps(cell))
    md = write_report([bench], tmp_path / "r")[0].read_text()
    sections = {part.split(" (")[0]: part for part in md.split("\n## ")[1:]}
    assert "torch threads, NVIDIA H100 80GB HBM3; speed" in sections["tiny:bert / ner"]
    assert "run on x86_64" in sections["tiny:bert / sentiment"] and "H100" not in sections["tiny:bert / sentiment"]
    assert "run on" not in (quick / "report.md").read_text()


def test_a_report_over_folders_that_split_the_methods_has_every_methods_speed(quick, tmp_path):
    """One suite run in parts (methods split across bench folders, each with its own micro-benchmark) reports every
    method's step time and memory, not only those of the first folder read."""
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, keep in ((first, {"lora"}), (second, {"ia3", "full"})):
        shutil.copytree(quick / "tiny-bert__sentiment", folder / "tiny-bert__sentiment")
        for cell in (folder / "tiny-bert__sentiment").iterdir():
            if cell.is_dir() and cell.name not in keep:
                shutil.rmtree(cell)
        speed_file = folder / "tiny-bert__sentiment" / "speed.json"
        speed = json.loads(speed_file.read_text())
        speed["methods"] = {label: entry for label, entry in speed["methods"].items() if label in keep}
        speed_file.write_text(json.dumps(speed))
    write_report([first, second], tmp_path / "r")
    summary = json.loads((tmp_path / "r.json").read_text())
    (group,) = [g for g in summary if g["task"] == "sentiment"]
    for label in ("lora", "ia3", "full"):
        assert group["step_seconds"][label]["ours"] > 0, label


def test_one_task_on_two_model_sizes_gets_the_size_study(quick, tmp_path):
    """Per model size: each method's quality relative to full fine-tuning against its trainable share, and the
    smallest share that reaches 95 % of full fine-tuning, recomputed here from the cells."""
    bench = tmp_path / "bench"
    shutil.copytree(quick / "tiny-bert__sentiment", bench / "tiny-bert__sentiment")
    shutil.copytree(quick / "tiny-bert__sentiment", bench / "tiny-big__sentiment")
    for path in (bench / "tiny-big__sentiment").rglob("cell.json"):
        cell = json.loads(path.read_text())
        cell["model"] = "tiny:big"
        cell["params"]["total"] *= 10
        path.write_text(json.dumps(cell))
    md = write_report([bench], tmp_path / "r")[0].read_text()
    assert "## Model size" in md and "smallest share" in md and (tmp_path / "r" / "size-quick-sentiment.png").exists()
    (study,) = json.loads((tmp_path / "r-size.json").read_text())
    assert [m["model"] for m in study["models"]] == ["tiny:bert", "tiny:big"]  # smallest first
    for model in study["models"]:
        cells = [json.loads(p.read_text()) for p in bench.glob("*/*/seed*/cell.json")]
        cells = [c for c in cells if c["model"] == model["model"] and c["implementation"] == "peftlab"]
        full = next(c for c in cells if c["label"] == "full")
        points = {
            c["label"]: (
                c["params"]["trainable"] / full["params"]["total"],
                c["quality"]["value"] / full["quality"]["value"],
            )
            for c in cells
            if c["label"] != "full"
        }
        reaching = [(share, label) for label, (share, relative) in points.items() if relative >= 0.95]
        expected = min(reaching)[1] if reaching else None
        assert (model["smallest_reaching_target"] or {}).get("label") == expected
        assert {p["label"]: round(p["share"], 9) for p in model["points"]} == {
            label: round(share, 9) for label, (share, _) in points.items()
        }
        # without the task head: what a method that adds parameters trains beyond them
        heads = {c["params"]["trainable"] - c["params"]["adapter"] for c in cells if c["params"].get("adapter")}
        assert len(heads) == 1 and model["task_head"] == heads.pop() > 0
        head, total = model["task_head"], full["params"]["total"]
        body = {label: (points[label][0] * total - head) / (total - head) for label in points}
        reaching = [(body[label], label) for label, (_, relative) in points.items() if relative >= 0.95]
        expected = min(reaching)[1] if reaching else None
        assert (model["smallest_reaching_target_without_head"] or {}).get("label") == expected
        assert {p["label"]: round(p["body_share"], 9) for p in model["points"]} == {
            label: round(share, 9) for label, share in body.items()
        }


def test_unfinished_cell_is_run_again_after_its_config_changed(tmp_path):
    suite = suite_with()
    plan = make_plan(suite, tmp_path, Filters(peers=False, speed=False))
    cell = plan.cells[0]
    from peftlab.bench.plan import CELL, finished

    cell.folder.mkdir(parents=True)
    (cell.folder / CELL).write_text(json.dumps({"fingerprint": "stale"}))
    assert not finished(cell, suite)


def test_bench_cli_errors(cli, tmp_path):
    code, _, err = cli("bench", "--suite", "methds", "--list", "--out", tmp_path)
    assert code == 2 and "'methds' is neither a packaged suite" in err and "did you mean 'methods'" in err
    code, _, err = cli("bench", "--quick", "--methods", "loar", "--out", tmp_path)
    assert code == 2 and "'loar' is not a method of suite 'quick'" in err
    code, _, err = cli("bench", "--quick", "--threads", "0", "--out", tmp_path)
    assert code == 2 and "--threads: expected a positive integer" in err
    code, _, err = cli("bench", "--report", "--out", tmp_path / "nothing")
    assert code == 2 and "not a bench folder" in err
    code, _, err = cli("bench", "--report", "--out", tmp_path, "--preface", tmp_path / "missing.md")
    assert code == 2 and "missing.md: --preface file not found" in err


def test_report_renders_in_headless_chromium(quick, tmp_path):
    """Take a screenshot of report.html and check that the tables and the plots are drawn."""
    import os
    import shutil
    import subprocess

    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        message = "headless Chromium is needed to check the report (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,3000",
            f"--screenshot={shot}",
            (quick / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from matplotlib.image import imread

    pixels = imread(str(shot))[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (3000, 1280)
    ink = (pixels < 0.9).any(axis=-1).mean()
    assert ink > 0.03, f"the page looks blank ({ink:.1%} of the pixels are not white)"
    # the plots' blue (peftlab's points and bars, #4c72b0) shows only if the PNG files were found and drawn
    blue = (abs(pixels - torch.tensor([0x4C, 0x72, 0xB0]).numpy() / 255) < 0.06).all(axis=-1).sum()
    assert blue > 500, "no plot is drawn: the images did not load"


def test_peer_quality_difference_pairs_the_seeds():
    """Our mean over three seeds against PEFT's seed 0 alone would mix seed noise into the difference."""

    def row(implementation, values):
        cells = [{"seed": seed, "quality": {"value": v}} for seed, v in values.items()]
        return Row("s", "m", "t", "classify", "lora", "lora", implementation, cells)

    ours = row("peftlab", {0: 0.80, 1: 0.70, 2: 0.60})
    assert paired_delta(ours, row("peft", {0: 0.79}), "accuracy") == "+1.0 pts"
    assert paired_delta(ours, row("peft", {0: 0.79, 2: 0.61}), "accuracy") == "+0.0 pts"
    assert paired_delta(ours, None, "accuracy") == "-"


def test_labels_of_neighbouring_points_are_stacked():
    points = [(2.44e6, 1.27, "lora"), (57_600, 1.53, "ia3"), (2.60e6, 1.27, "dora"), (2.7e6, 1.3, "x")]
    assert label_offsets(points) == [(4, 4), (4, 4), (4, -6), (4, -16)]


def test_decoder_tables_show_answer_accuracy_and_forgetting_per_corpus():
    """Runs store forgetting per general-text corpus; the table gives each corpus a column (mean over seeds)."""

    def cell(seed, loss, answers, after):
        forgetting = {"news": {"before": 30.0, "after": after, "change": after - 30.0}}
        metrics = {"test": {"loss": loss, "answer_accuracy": answers}}
        return {"seed": seed, "quality": {"value": loss}, "metrics": metrics, "forgetting": forgetting, "lr": 5e-4}

    group = Group("decoder", "m", "i", "sft", "loss", False)
    group.rows[("lora", "peftlab")] = Row(
        "decoder", "m", "i", "sft", "lora", "lora", "peftlab", [cell(0, 1.2, 0.7, 31.0), cell(1, 1.4, 0.5, 32.0)]
    )
    header, rows = method_table(group)
    assert header[2] == "answer accuracy" and header[-1] == "forgetting: news ppl"
    assert rows[0][2] == "60.0 ± 14.1" and rows[0][-1] == "30.0 → 31.5 (+5.0%)"
    assert "news perplexity 30.0 → 31.5 (+5.0%)" in standings(group)[0]


def test_a_peer_retraces_our_run_with_dropout(tiny_model_dir, tiny_csv, tmp_path):
    """fit seeds the dropout RNG from the seed, so a PEFT peer built from our start weights sees the same masks,
    whatever the global RNG went through before (building our model consumed it, building the peer's did not)."""
    from peftlab.run import RunOptions, build_model, prepare_data
    from tests.short_fit import run_fit

    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    data = prepare_data(options, quiet=True)

    def with_dropout():
        model = build_model(options, data, 0)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.2
        return model

    ours = peftlab.attach(with_dropout(), "lora")
    peer = build_peer(ours, with_dropout(), "classify", tmp_path / "init", 6)
    run_fit(ours, data, tmp_path / "ours", 6)
    torch.rand(7)  # a different global RNG state when the peer's fit starts
    run_fit(peer, data, tmp_path / "peer", 6, hooks=peer_hooks(peer))
    batch = data.splits["test"].batch(list(range(8)))
    with torch.no_grad():
        logits = [m.model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits for m in (ours, peer)]
    assert not torch.allclose(logits[0], build_model(options, data, 0).eval()(batch["input_ids"]).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


# --- the learning-rate search -----------------------------------------------------------------------------------

GRID_SUITE = """
name = "grid"
seeds = [0, 1]
models = ["tiny:bert"]
lr_grid = [0.1, 10]

[budget]
max_steps = 4

[train]
batch_size = 8

[speed]
enabled = false

[[tasks]]
name = "sentiment"
task = "classify"
data = ["tiny:sentiment"]
options = { max_length = 32 }

[[methods]]
name = "lora"
lr = 1e-3

[[methods]]
name = "ia3"
"""


@pytest.mark.parametrize(
    "grid, message",
    [
        ([], "lr_grid: expected a non-empty list of positive numbers"),
        ([0.5, 0], "lr_grid: expected positive numbers, got 0"),
        ([-1], "lr_grid: expected positive numbers, got -1"),
        (["x"], "lr_grid: expected positive numbers, got 'x'"),
        ([3, 3], "lr_grid: factor 3 is named twice"),
    ],
)
def test_suite_lr_grid_errors_name_the_key(grid, message):
    with pytest.raises(InputError, match=f"test.toml: {message}"):
        suite_with(lr_grid=grid)


def test_lr_grid_adds_the_base_rate_and_keeps_its_folder(tmp_path):
    """Factor 1 is always tried; the base rate's cells keep the folder and fingerprint a run without a grid gives
    them (so old bench folders and --reuse still hold), the other rates go beside them, peers at the base rate only."""
    from peftlab.bench.plan import cell_config
    from peftlab.bench.suite import fingerprint

    plain = make_plan(suite_with(methods=[{"name": "lora", "lr": 1e-3}]), tmp_path)
    grid = make_plan(suite_with(methods=[{"name": "lora", "lr": 1e-3}], lr_grid=[3, 0.3]), tmp_path)
    assert grid.suite.lr_grid == [0.3, 1.0, 3.0]
    where = {c.folder.relative_to(tmp_path).as_posix(): c for c in grid.cells}
    assert sorted(where) == [
        "tiny-bert__s/lora/seed0",
        "tiny-bert__s/lora/seed0/peer",
        "tiny-bert__s/lora@lr0.0003/seed0",
        "tiny-bert__s/lora@lr0.003/seed0",
    ]
    assert [c.folder for c in plain.cells] == [
        where["tiny-bert__s/lora/seed0"].folder,
        where["tiny-bert__s/lora/seed0/peer"].folder,
    ]
    assert where["tiny-bert__s/lora@lr0.003/seed0"].lr == pytest.approx(3e-3)
    assert cell_config(where["tiny-bert__s/lora@lr0.003/seed0"], grid.suite)["lr"] == pytest.approx(3e-3)
    for old, new in zip(plain.cells, grid.cells[1:3], strict=True):  # base cell and its peer, as before
        assert fingerprint(cell_config(old, plain.suite)) == fingerprint(cell_config(new, grid.suite))
    # --lr-grid (Filters.lr_grid) wins over the suite's
    overridden = make_plan(grid.suite, tmp_path, Filters(lr_grid=[1.0, 2.0], peers=False))
    assert [c.lr for c in overridden.cells] == [1e-3, pytest.approx(2e-3)]


def test_choose_rate_goes_by_the_metrics_direction_and_ties_to_the_base():
    from peftlab.bench.lr_search import choose_rate

    means = {1e-4: 0.7, 1e-3: 0.8, 1e-2: 0.6}
    assert choose_rate(means, 1e-3, higher_is_better=True) == 1e-3
    assert choose_rate(means, 1e-3, higher_is_better=False) == 1e-2
    # a tie goes to the rate nearest the base rate on a log scale: 3e-3 is x3 away, 1e-4 x10
    assert choose_rate({1e-4: 0.9, 3e-3: 0.9, 1e-3: 0.5}, 1e-3, higher_is_better=True) == 3e-3
    # a rate without validation values cannot win; none with any: the base rate
    assert choose_rate({1e-4: None, 1e-3: 0.5}, 1e-4, higher_is_better=True) == 1e-3
    assert choose_rate({1e-4: None, 1e-3: None}, 1e-3, higher_is_better=True) == 1e-3


def expected_choice(rates: dict[float, list[float]], base: float, higher_is_better: bool) -> float:
    """The rule, written out again: the best mean validation value; among equal means, the rate nearest the base."""
    import math

    means = {lr: sum(v) / len(v) for lr, v in rates.items()}
    best = (max if higher_is_better else min)(means.values())
    tied = [lr for lr, m in means.items() if abs(m - best) < 1e-12]
    return min(tied, key=lambda lr: (abs(math.log(lr / base)), lr))


def test_lr_grid_runs_every_rate_and_reports_the_choice_made_on_validation(cli, tmp_path):
    suite = tmp_path / "grid.toml"
    suite.write_text(GRID_SUITE)
    out = tmp_path / "bench"
    code, text, _ = cli("bench", "--suite", suite, "--out", out, "--methods", "lora", "--seeds", "0", "1")
    assert code == 0, text
    assert "8 cells" in text  # lora at three rates and two seeds, and its PEFT peer at the base rate only
    peers = sorted(p.parent.parent.relative_to(out).as_posix() for p in out.glob("*/*/seed*/peer/cell.json"))
    assert peers == ["tiny-bert__sentiment/lora/seed0", "tiny-bert__sentiment/lora/seed1"]
    rates: dict[float, list[float]] = {}
    for path in sorted(out.glob("tiny-bert__sentiment/*/seed*/cell.json")):
        cell = json.loads(path.read_text())
        assert cell["label"] == "lora"
        folder = path.parent.parent.name
        assert folder == ("lora" if cell["lr"] == 1e-3 else f"lora@lr{cell['lr']:.12g}")
        assert ("lr_base" in cell) == (folder != "lora") and cell.get("lr_base", 1e-3) == 1e-3
        rates.setdefault(cell["lr"], []).append(cell["metrics"]["validation"]["accuracy"])
    assert sorted(rates) == [pytest.approx(1e-4), 1e-3, pytest.approx(1e-2)]
    assert all(len(v) == 2 for v in rates.values())
    assert not list(out.glob("*/ia3*"))  # --methods holds with a grid
    chosen = expected_choice(rates, 1e-3, higher_is_better=True)

    summary = json.loads((out / "report.json").read_text())[0]
    (search,) = summary["lr_search"]
    assert search["label"] == "lora" and search["base_lr"] == 1e-3 and search["chosen_lr"] == chosen
    assert [r["factor"] for r in search["rates"]] == [0.1, 1.0, 10.0]
    for r in search["rates"]:
        assert r["validation_mean"] == pytest.approx(sum(rates[r["lr"]]) / 2) and r["seeds"] == [0, 1]
    (row,) = [r for r in summary["rows"] if r["implementation"] == "peftlab"]
    assert row["lr"] == chosen and row["seeds"] == 2  # the main table shows the chosen rate's cells

    md = (out / "report.md").read_text()
    section = md.split("## Learning-rate search")[1].split("\n## ")[0]
    assert "The choice used validation data only" in section
    assert "| method | base lr | × 0.1 | × 1 | × 10 | chosen lr |" in section
    assert f"| **{chosen:g}** (× {chosen / 1e-3:.12g}) |" in section
    assert "learning-rate search over factors 0.1, 1, 10" in md  # the note on peers at the base rate only

    # --reuse copies every rate's cells; the command line's grid wins over the suite's
    again = tmp_path / "again"
    code, text, _ = cli("bench", "--suite", suite, "--out", again, "--methods", "lora", "--reuse", out, "--no-peer")
    assert code == 0 and "6 reused, 0 run now" in text
    code, text, _ = cli(
        "bench", "--suite", suite, "--out", again, "--methods", "lora", "--lr-grid", "1,10", "--no-peer", "--list"
    )
    assert code == 0 and "lr 0.0001" not in text and "lr 0.01 seed 0" in text


@pytest.mark.parametrize("value", ["", "0.3,,3", "abc", "0", "-1,2", "1,inf"])
def test_bad_lr_grid_values_exit_2_with_one_error_line(cli, tmp_path, value):
    code, out, err = cli("bench", "--quick", "--list", "--out", tmp_path, f"--lr-grid={value}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --lr-grid: "), err


def test_without_a_grid_the_report_has_no_search(quick):
    assert "Learning-rate search" not in (quick / "report.md").read_text()
    assert all("lr_search" not in g for g in json.loads((quick / "report.json").read_text()))
    assert not list(quick.glob("*/*@lr*"))


def test_share_of_the_model_divides_by_the_pretrained_model_not_what_the_method_adds():
    """Diff pruning trains a difference vector and a gate per weight: 200 % of the model, not 100 % of the total."""
    from peftlab.bench.collect import Row
    from peftlab.bench.summary_tables import fmt_share, model_parameters

    params = {"total": 3_000, "base": 1_000, "adapter": 2_000, "trainable": 2_000, "changed": 5}
    row = Row("s", "m", "t", "classify", "diff_pruning", "diff_pruning", "peftlab", [{"params": params}])
    assert fmt_share(row.mean("params", "trainable"), model_parameters(row)) == "200%"
    assert fmt_share(row.mean("params", "changed"), model_parameters(row)) == "0.5%"
    older = Row("s", "m", "t", "classify", "lora", "lora", "peftlab", [{"params": {"total": 400, "trainable": 4}}])
    assert fmt_share(4, model_parameters(older)) == "1%"  # cells without "base" divide by the total
