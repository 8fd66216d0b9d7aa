"""The asset registry: pull a wheel, check every file's SHA-256, refuse a mismatch, cache where told."""

import hashlib
import json
import zipfile

import pytest

from peftlab.assets import Asset, WheelFile, is_pulled, locate, pull, set_cache_dir, verify
from peftlab.assets.store import cache_dir
from peftlab.errors import InputError, PeftlabError

PAYLOAD = b"id,text\n1,hello\n"


def fake_asset(sha256: str) -> Asset:
    return Asset(
        name="fake_data",
        kind="dataset",
        description="a test asset",
        licence="CC0-1.0",
        packages=(("fake-pkg", "1.0"),),
        files=(WheelFile("fake-pkg", "fake_pkg/data/file.csv", sha256, "file.csv"),),
        download_mb=0.0,
    )


@pytest.fixture()
def wheelhouse(tmp_path, monkeypatch):
    house = tmp_path / "wheels"
    house.mkdir()
    with zipfile.ZipFile(house / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/data/file.csv", PAYLOAD)
        zf.writestr("fake_pkg/__init__.py", "")
    monkeypatch.setenv("PEFTLAB_WHEELHOUSE", str(house))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    yield house
    set_cache_dir(None)


def test_pull_checks_the_hash_and_records_the_licence(wheelhouse, tmp_path):
    asset = fake_asset(hashlib.sha256(PAYLOAD).hexdigest())
    folder = pull(asset, quiet=True)
    assert folder == tmp_path / "cache" / "assets" / "fake_data"
    assert (folder / "file.csv").read_bytes() == PAYLOAD
    manifest = json.loads((folder / "asset.json").read_text())
    assert manifest["licence"] == "CC0-1.0" and manifest["packages"] == [{"name": "fake-pkg", "version": "1.0"}]
    assert is_pulled(asset) and locate(asset, quiet=True) == folder
    assert verify(asset) == []


def test_a_hash_mismatch_is_refused_and_leaves_nothing(wheelhouse, tmp_path):
    asset = fake_asset("0" * 64)
    with pytest.raises(PeftlabError, match="has SHA-256 .* the registry expects 0000.*refusing it"):
        pull(asset, quiet=True)
    assert not (tmp_path / "cache" / "assets" / "fake_data").exists()
    assert not list((tmp_path / "cache" / "assets").glob(".*"))


def test_verify_notices_a_tampered_file(wheelhouse):
    asset = fake_asset(hashlib.sha256(PAYLOAD).hexdigest())
    folder = pull(asset, quiet=True)
    (folder / "file.csv").write_bytes(b"evil")
    assert verify(asset) == ["file.csv"]


def test_cache_folder_follows_the_flag_over_the_environment(wheelhouse, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    set_cache_dir(tmp_path / "elsewhere")
    assert (
        pull(fake_asset(hashlib.sha256(PAYLOAD).hexdigest()), quiet=True)
        == tmp_path / "elsewhere" / "assets" / "fake_data"
    )


def test_unknown_asset_suggests_a_name():
    with pytest.raises(InputError, match="unknown asset 'minilmm' \\(did you mean 'minilm'\\?\\)"):
        pull("minilmm")


def test_assets_list_command(cli):
    code, out, _ = cli("assets", "list")
    assert code == 0 and "minilm" in out and "rotten_tomatoes" in out and "Apache-2.0" in out


@pytest.mark.parametrize("form", ["two words", "with ="])
def test_the_cache_dir_option_takes_its_value_in_either_form(cli, tmp_path, monkeypatch, form):
    import peftlab.assets.store as store

    monkeypatch.setattr(store, "_cache_override", None)  # undone after the test, whatever the CLI sets
    folder = tmp_path / "cache"
    args = ["--cache-dir", str(folder)] if form == "two words" else [f"--cache-dir={folder}"]
    code, out, _ = cli(*args, "assets", "list")
    assert code == 0 and "minilm" in out
    assert store.cache_dir() == folder


@pytest.mark.real
def test_real_assets_pull_and_verify():
    for name in ("minilm", "rotten_tomatoes"):
        locate(name, quiet=True)
        assert verify(name) == []


def test_a_folder_is_pinned_by_its_tree_hash(tmp_path, monkeypatch):
    from peftlab.assets.store import folder_tree_hash, tree_hash

    house = tmp_path / "wheels"
    house.mkdir()
    files = {"a/one.txt": b"1", "a/sub/two.txt": b"22", "a/skip.py": b"x"}
    with zipfile.ZipFile(house / "fold_pkg-2.0-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(f"fold_pkg/{name}", data)
    monkeypatch.setenv("PEFTLAB_WHEELHOUSE", str(house))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    from peftlab.assets.registry import WheelFolder

    good = tree_hash(
        [("one.txt", hashlib.sha256(b"1").hexdigest()), ("sub/two.txt", hashlib.sha256(b"22").hexdigest())]
    )
    asset = Asset(
        "folder_data",
        "dataset",
        "",
        "CC0",
        (("fold-pkg", "2.0"),),
        (),
        0.0,
        folders=(WheelFolder("fold-pkg", "fold_pkg/a/", good, "texts", ".txt"),),
    )
    folder = pull(asset, quiet=True)
    assert (folder / "texts" / "sub" / "two.txt").read_bytes() == b"22" and not (folder / "texts" / "skip.py").exists()
    assert folder_tree_hash(folder / "texts") == good and verify(asset) == []
    (folder / "texts" / "one.txt").write_bytes(b"changed")
    assert verify(asset) == ["texts/"]
    bad = Asset(
        "folder_bad",
        "dataset",
        "",
        "CC0",
        (("fold-pkg", "2.0"),),
        (),
        0.0,
        folders=(WheelFolder("fold-pkg", "fold_pkg/a/", "0" * 64, "texts", ".txt"),),
    )
    with pytest.raises(PeftlabError, match="the 2 files under fold_pkg/a/ .* tree hash .* refusing them"):
        pull(bad, quiet=True)
    assert not (tmp_path / "cache" / "assets" / "folder_bad").exists()
