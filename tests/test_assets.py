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


@pytest.mark.real
def test_real_assets_pull_and_verify():
    for name in ("minilm", "rotten_tomatoes"):
        locate(name, quiet=True)
        assert verify(name) == []
