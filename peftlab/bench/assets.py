"""Models and data a suite names, resolved to what ``run_training`` takes; tiny ones are built on the fly.

Besides packaged names (``minilm``, ``wnut16``, ...) and paths, a suite may name

- ``tiny:bert`` / ``tiny:llama``: randomly initialised 2-layer BERT / Llama models (hidden size 32) with a
  word-level tokenizer over a small vocabulary (the Llama one with a ChatML template), built from configs, so the
  ``quick`` suite needs no download and runs in CI in a minute or two;
- ``tiny:sentiment`` (classify: short reviews whose label follows from their sentiment words), ``tiny:ner`` (tag:
  sentences with person, place and organisation names, BIO tags) and ``tiny:instructions`` (sft: "is this review
  positive or negative?" instructions answered by one word, with ``answers`` for answer accuracy);
- ``bench:rt_instructions``: an instruction-following version of the packaged Rotten Tomatoes data (the same
  split, three phrasings of the question, the answer ``positive`` or ``negative``), a small packaged SFT source for
  the decoder suite until the instruction mixture lands.

Everything built is written once into ``<bench folder>/assets/`` and reused, deterministically (fixed seeds). The
test suite builds its tiny models with the same ``build_tiny_bert`` / ``build_tiny_llama`` over its own word list.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_folder

POSITIVE = ["great", "wonderful", "moving", "funny", "brilliant", "charming", "superb", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "tedious", "clumsy", "bland", "painful", "lifeless"]
FILLER = ["the", "film", "movie", "story", "was", "is", "a", "an", "and", "of", "plot", "acting", "this", "it"]
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
PLACES = [["paris"], ["london"], ["new", "york"], ["rome"], ["tokyo"]]
ORGS = [["acme", "corp"], ["globex"], ["initech"], ["umbrella", "labs"]]
LINKS = ["met", "visited", "called", "saw", "joined", "left", "in", "at", "with", "yesterday", "today", "then"]
QUESTION = ["is", "this", "review", "positive", "or", "negative", "?", "answer", ":", "sentiment"]
CHAT = ["user", "assistant", "system"]
WORDS = sorted(
    set(POSITIVE + NEGATIVE + FILLER + PEOPLE + LINKS + QUESTION + CHAT)
    | {w for place in PLACES for w in place}
    | {w for org in ORGS for w in org}
)


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLAMA_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer(words: list[str], chat: bool):
    """A word-level fast tokenizer over ``words`` (ids follow the specials, in the given order): BERT-style with
    [CLS] ... [SEP] templates, or (``chat``) Llama-style with a ChatML chat template. Returns (tokenizer, vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = LLAMA_SPECIALS if chat else BERT_SPECIALS
    vocab = {t: i for i, t in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    if chat:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            unk_token="<unk>",
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            model_max_length=128,
        )
        fast.chat_template = CHATML
        return fast, vocab
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    return fast, vocab


def tiny_bert_config(vocab_size: int, num_labels: int = 2, dropout: float = 0.0):
    """A 2-layer BERT, hidden size 32; no dropout by default, so a PEFT peer retraces peftlab's run exactly."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def build_tiny_bert(folder: Path, words: list[str] = WORDS) -> None:
    """A randomly initialised (seed 0) tiny BERT body and its word tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import BertModel

    tokenizer, vocab = word_tokenizer(words, chat=False)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(len(vocab)), add_pooling_layer=True).save_pretrained(folder)


def tiny_llama_config(vocab_size: int, **overrides):
    """A tiny Llama configuration: 2 layers of width 32, 4 heads sharing 2 key/value heads, 128 positions."""
    from transformers import LlamaConfig

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)  # fmt: skip
    return LlamaConfig(vocab_size=vocab_size, **(shape | overrides))


def build_tiny_llama(folder: Path, words: list[str] = WORDS) -> None:
    """A randomly initialised (seed 0) tiny Llama causal LM (tied head) with a ChatML word tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer, vocab = word_tokenizer(words, chat=True)
    tokenizer.save_pretrained(folder)
    config = tiny_llama_config(
        len(vocab), bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"], tie_word_embeddings=True
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # embeddings large enough that a tied head reaches confident logits
        model.model.embed_tokens.weight.normal_(0, 0.3)
    model.save_pretrained(folder)


def _review(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words)


def _tiny_sentiment(folder: Path) -> None:
    import csv

    rng = random.Random(0)
    with open(folder / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(400):
            w.writerow([_review(rng, i % 2 == 0), "pos" if i % 2 == 0 else "neg"])


def _tiny_ner(folder: Path) -> None:
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        words: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(2, 4)):
            kind = rng.choice(["PER", "LOC", "ORG"])
            name = [rng.choice(PEOPLE)] if kind == "PER" else rng.choice(PLACES if kind == "LOC" else ORGS)
            words += [rng.choice(LINKS)] + name
            tags += ["O"] + [f"{'B' if j == 0 else 'I'}-{kind}" for j in range(len(name))]
        lines += [f"{w}\t{t}" for w, t in zip(words, tags, strict=True)] + [""]
    (folder / "ner.conll").write_text("\n".join(lines), encoding="utf-8")


def _tiny_instructions(folder: Path) -> None:
    rng = random.Random(0)
    with open(folder / "instructions.jsonl", "w", encoding="utf-8") as f:
        for i in range(300):
            answer = "positive" if i % 2 == 0 else "negative"
            record = {
                "instruction": "is this review positive or negative ?",
                "input": _review(rng, answer == "positive"),
                "output": answer,
                "answers": [answer],
                "task": "sentiment",
            }
            f.write(json.dumps(record) + "\n")


RT_TEMPLATES = [
    "Is this movie review positive or negative?\n\n{text}",
    "Review: {text}\n\nDid the critic like the film? Answer positive or negative.",
    "What is the sentiment of the following review (positive or negative)?\n{text}",
]
RT_SIZES = {"train": 2000, "validation": 100, "test": 100}


def _rt_instructions(folder: Path) -> None:
    """Rotten Tomatoes as instructions: the packaged split (split seed 0), the first examples of each split."""
    from ..data.classification import Columns, load_classification

    data = load_classification("rotten_tomatoes", Columns(), split_seed=0, quiet=True)
    words = {"fresh": "positive", "rotten": "negative"}
    for split, size in RT_SIZES.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, example in enumerate(data.splits[split][:size]):
                answer = words[data.labels[example.label]]
                record = {
                    "messages": [
                        {"role": "user", "content": RT_TEMPLATES[i % len(RT_TEMPLATES)].format(text=example.text)},
                        {"role": "assistant", "content": answer},
                    ],
                    "answers": [answer],
                    "task": "rt_sentiment",
                }
                f.write(json.dumps(record) + "\n")


BUILT_MODELS = {"tiny:bert": build_tiny_bert, "tiny:llama": build_tiny_llama}
# name -> (builder, the file or folder inside the built folder that the data loaders read)
BUILT_DATA = {
    "tiny:sentiment": (_tiny_sentiment, "reviews.csv"),
    "tiny:ner": (_tiny_ner, "ner.conll"),
    "tiny:instructions": (_tiny_instructions, "instructions.jsonl"),
    "bench:rt_instructions": (_rt_instructions, "."),
}


def _built(name: str, builder, assets: Path) -> Path:
    folder = assets / name.replace(":", "-")
    if not folder.is_dir():
        with atomic_folder(folder) as tmp:
            builder(tmp)
    return folder


def resolve_model(spec: str, assets: Path, folders: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(what --model takes, or None when unavailable; a note saying why). ``folders`` maps a model name to a local
    Hugging Face folder standing in for it (a model that is not packaged yet, fetched by hand)."""
    from ..models import MODEL_NAMES

    if folders and spec in folders:
        folder = Path(folders[spec]).expanduser()
        if not (folder / "config.json").is_file():
            raise InputError(f"--model-dir: {folder} (for {spec!r}) is not a Hugging Face model folder")
        return str(folder), ""
    if spec in BUILT_MODELS:
        return str(_built(spec, BUILT_MODELS[spec], assets)), ""
    if spec in MODEL_NAMES:
        return spec, ""
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return str(path), ""
    return None, (
        f"model {spec!r} is neither a packaged model ({', '.join(MODEL_NAMES)}) nor a Hugging Face model folder"
    )


def data_available(spec: str, kind: str) -> bool:
    from ..data.classification import PACKAGED
    from ..data.sft import PACKAGED_SFT
    from ..data.spans import PACKAGED_SPANS
    from ..data.tagging import PACKAGED_TAGGING

    if spec in BUILT_DATA:
        return True
    packaged = {"classify": PACKAGED, "tag": PACKAGED_TAGGING, "span": PACKAGED_SPANS, "sft": PACKAGED_SFT}[kind]
    return spec in packaged or Path(spec).expanduser().exists()


def resolve_data(specs: list[str], kind: str, assets: Path) -> tuple[str | None, str | None, str]:
    """(the name used, what --data takes, a note) for the first available of ``specs``; (None, None, note) if none."""
    for spec in specs:
        if not data_available(spec, kind):
            continue
        if spec in BUILT_DATA:
            builder, inside = BUILT_DATA[spec]
            return spec, str(_built(spec, builder, assets) / inside), ""
        return spec, spec, ""
    return None, None, f"none of the data {', '.join(map(repr, specs))} is available for a {kind} task"


def check_spec(spec: str) -> None:
    if spec.startswith(("tiny:", "bench:")) and spec not in BUILT_MODELS and spec not in BUILT_DATA:
        known = ", ".join(sorted([*BUILT_MODELS, *BUILT_DATA]))
        raise InputError(f"suite: unknown built asset {spec!r}; known: {known}")
