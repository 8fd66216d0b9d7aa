"""Templates that turn labelled data into instructions, the way FLAN (Wei et al., 2021, arXiv:2109.01652) and P3 /
T0 (Sanh et al., 2021, arXiv:2110.08207) were built, and the instruction mixture made from them.

A *task* reads a packaged dataset into ``Example`` records (its input fields plus a class label or the acceptable
outputs). Each task has several ``Template`` phrasings: a user prompt with ``{field}`` slots (and ``{options}``,
the answer words listed) and, for classification, a *verbalizer* mapping each class to the answer word the
template expects (``fresh`` -> ``positive``, or -> ``yes`` for "did the critic like it?"). Some templates list the
options, some do not, and some put the input before the question. A rendered example is a
``TemplatedConversation``: an ordinary ``Conversation`` (user prompt, assistant answer, ``task``, ``answers``) that
also remembers its template and source example, so the baselines can re-render demonstrations in the same
phrasing and read the raw text for PET.

Classification tasks also carry a PET pattern (Schick & Schuetze, 2021, arXiv:2001.07676): a cloze text ending
right before the label word, and a verbalizer of label words whose log-probabilities the LM head gives after it.

Tasks (``TASKS``):

============== ================== ====================================================== ==========
task           data               output                                                 templates
============== ================== ====================================================== ==========
sentiment      rotten_tomatoes    positive / negative (or yes / no)                      5
topic          bbc_news           business, entertainment, politics, sport, tech          4
headline       bbc_news           the article's title, from its first 60 words           3
entities       wnut16             "name (type); ..." or "none" (or names only)            3
tweet_sentiment tweet_sentiment   negative / neutral / positive                           4
open_qa        chatterbot_qa      a short answer (any of the corpus's alternatives)       3
============== ================== ====================================================== ==========

The mixture (``build_mixture``, registered as the packaged SFT dataset ``instruct_mix``) is documented there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import locate
from .conversations import Conversation
from .splits import assign_splits

# --- records -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One labelled example of a task, before any template: input fields and a class or acceptable outputs."""

    task: str
    fields: dict[str, str]
    label: str | None = None  # class name (classification tasks)
    outputs: tuple[str, ...] = ()  # acceptable outputs, the first is the reference (generation tasks)


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str  # user message; {field} slots and {options}
    verbalizer: dict[str, str] | None = None  # class -> answer word (classification); None: the example's outputs
    output: Callable[[Example], tuple[str, ...]] | None = None  # generation: acceptable outputs (default: outputs)

    def answers(self, example: Example) -> tuple[str, ...]:
        if self.verbalizer is not None:
            return (self.verbalizer[example.label],)
        return self.output(example) if self.output else example.outputs

    def render(self, example: Example) -> TemplatedConversation:
        words = list(dict.fromkeys(self.verbalizer.values())) if self.verbalizer else []
        options = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else "".join(words)
        prompt = self.prompt.format(options=options, **example.fields)
        answers = self.answers(example)
        return TemplatedConversation(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[0]}],
            task=example.task,
            answers=list(answers),
            template=self.name,
            example=example,
        )


@dataclass
class TemplatedConversation(Conversation):
    template: str = ""
    example: Example | None = None


@dataclass(frozen=True)
class PetPattern:
    """A cloze pattern over the example's fields (ends where the label word goes) and one word per class."""

    pattern: str
    verbalizer: dict[str, str]  # class -> label word (with its leading space, as the LM would write it)

    def text(self, example: Example) -> str:
        return self.pattern.format(**example.fields)


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # packaged asset the examples come from
    read: Callable[[Path], list[Example]]
    templates: tuple[Template, ...]
    labels: tuple[str, ...] = ()  # classes, for classification tasks
    pet: PetPattern | None = None

    def examples(self, quiet: bool = True) -> list[Example]:
        return self.read(locate(self.dataset, quiet=quiet))


# --- readers -----------------------------------------------------------------------------------------------------


def lead(text: str, words: int = 60) -> str:
    """The first ``words`` words of a text (whitespace collapsed), with an ellipsis when cut."""
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def _rotten_tomatoes(folder: Path) -> list[Example]:
    from .classification import _rotten_tomatoes

    pairs, _ = _rotten_tomatoes(folder)
    return [Example("sentiment", {"text": t}, label) for t, label in pairs]


def _tweets(folder: Path) -> list[Example]:
    from .classification import _tweet_sentiment

    pairs, _ = _tweet_sentiment(folder)
    return [Example("tweet_sentiment", {"text": " ".join(t.split())}, label) for t, label in pairs]


def _bbc_articles(folder: Path) -> list[tuple[str, str, str]]:
    """(topic, title, body) per article; the title is the first line."""
    from .classification import _bbc_news

    pairs, _ = _bbc_news(folder)
    out = []
    for text, topic in pairs:
        title, _, body = text.partition("\n")
        if title.strip() and body.strip():
            out.append((topic, title.strip(), body.strip()))
    return out


def _bbc_topic(folder: Path) -> list[Example]:
    return [Example("topic", {"text": lead(f"{title}. {body}")}, topic) for topic, title, body in _bbc_articles(folder)]


def _bbc_headline(folder: Path) -> list[Example]:
    return [Example("headline", {"text": lead(body)}, outputs=(title,)) for _, title, body in _bbc_articles(folder)]


ENTITY_TYPES = {
    "person": "person",
    "geo-loc": "location",
    "company": "company",
    "facility": "facility",
    "product": "product",
    "musicartist": "music artist",
    "sportsteam": "sports team",
    "tvshow": "TV show",
    "movie": "movie",
    "other": "other",
}


def _entities(folder: Path) -> list[Example]:
    """Tweets with their entities as text: ``name (type); name (type)`` in order of appearance, or ``none``."""
    from .tagging import _wnut16, entities

    out = []
    for _, words, tags in _wnut16(folder):
        found = sorted(entities(tags), key=lambda e: e[1])
        spans = [(" ".join(words[a:b]), ENTITY_TYPES.get(kind, kind)) for kind, a, b in found]
        typed = "; ".join(f"{name} ({kind})" for name, kind in spans) or "none"
        names = ", ".join(name for name, _ in spans) or "none"
        out.append(Example("entities", {"text": " ".join(words)}, outputs=(typed, names)))
    return out


def _open_qa(folder: Path) -> list[Example]:
    from .corpora import chatterbot

    items, _ = chatterbot(folder)
    return [Example("open_qa", {"question": q.question, "topic": q.topic}, outputs=tuple(q.answers)) for q in items]


# --- the tasks ---------------------------------------------------------------------------------------------------

_POS_NEG = {"rotten": "negative", "fresh": "positive"}
_TWEET = {"negative": "negative", "neutral": "neutral", "positive": "positive"}
_TOPICS = {  # the folder "sports" is answered "sport"
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "sentiment",
            "rotten_tomatoes",
            _rotten_tomatoes,
            (
                Template("options_first", "Is this movie review positive or negative?\n\n{text}", _POS_NEG),
                Template("review_then_options", "Review: {text}\n\nIs the review {options}?", _POS_NEG),
                Template(
                    "liked",
                    "{text}\n\nDid the critic like the movie? Answer yes or no.",
                    {"rotten": "no", "fresh": "yes"},
                ),
                Template("no_options", "How does the critic feel about the film?\n\n{text}", _POS_NEG),
                Template("classify", "Classify the sentiment of the text as {options}.\n\nText: {text}", _POS_NEG),
            ),
            labels=("rotten", "fresh"),
            pet=PetPattern("{text} All in all, the movie was", {"rotten": " bad", "fresh": " good"}),
        ),
        Task(
            "topic",
            "bbc_news",
            _bbc_topic,
            (
                Template("options_first", "Which topic is this article about? Options: {options}\n\n{text}", _TOPICS),
                Template(
                    "article_then_question",
                    "{text}\n\nWhich section of a newspaper would this appear in: {options}?",
                    _TOPICS,
                ),
                Template("no_options", "Give the topic of this news article in one word.\n\n{text}", _TOPICS),
                Template("classify", "Classify the news article as {options}.\n\nArticle: {text}", _TOPICS),
            ),
            labels=tuple(_TOPICS),
            pet=PetPattern(
                "{text}\n\nThis article is about",
                {
                    "business": " business",
                    "entertainment": " entertainment",
                    "politics": " politics",
                    "sports": " sport",
                    "tech": " technology",
                },
            ),
        ),
        Task(
            "headline",
            "bbc_news",
            _bbc_headline,
            (
                Template("write", "Write a headline for this news story.\n\n{text}"),
                Template("story_then_question", "{text}\n\nWhat is a good title for this story?"),
                Template("short_title", "Give this article a short title.\n\nArticle: {text}"),
            ),
        ),
        Task(
            "entities",
            "wnut16",
            _entities,
            (
                Template(
                    "typed",
                    "List the named entities in this tweet as 'name (type)' separated by semicolons, or answer "
                    "none.\n\n{text}",
                ),
                Template(
                    "tweet_then_question",
                    "Tweet: {text}\n\nWhich people, places, companies, products or other names does it mention? "
                    "Give each as 'name (type)', separated by semicolons; none if there are none.",
                ),
                Template(
                    "names_only",
                    "Extract the names mentioned in the text, separated by commas (none if there are none).\n\n{text}",
                    output=lambda e: e.outputs[1:],
                ),
            ),
        ),
        Task(
            "tweet_sentiment",
            "tweet_sentiment",
            _tweets,
            (
                Template("options_first", "What is the sentiment of this tweet? Options: {options}\n\n{text}", _TWEET),
                Template("tweet_then_options", "Tweet: {text}\n\nIs the tweet {options}?", _TWEET),
                Template("classify", "Classify the sentiment of the text as {options}.\n\nText: {text}", _TWEET),
                Template("feel", "{text}\n\nHow does the author feel? Answer {options}.", _TWEET),
            ),
            labels=("negative", "neutral", "positive"),
            pet=PetPattern(
                "{text} The mood of this tweet is",
                {"negative": " negative", "neutral": " neutral", "positive": " positive"},
            ),
        ),
        Task(
            "open_qa",
            "chatterbot_qa",
            _open_qa,
            (
                Template("plain", "{question}"),
                Template("answer_briefly", "Answer the question in one sentence.\n\n{question}"),
                Template("question_label", "Question: {question}\nGive a short answer."),
            ),
        ),
    ]
}


# --- the instruction mixture -------------------------------------------------------------------------------------

# Examples per split drawn from each task (train, validation, test); held-out tasks give test examples only.
MIXTURE_TASKS: dict[str, tuple[int, int, int]] = {
    "sentiment": (480, 24, 40),
    "topic": (240, 12, 24),
    "headline": (160, 8, 16),
    "entities": (240, 12, 24),
}
HELD_OUT_TASKS: dict[str, int] = {"tweet_sentiment": 100, "open_qa": 100}
DEMONSTRATIONS = 64  # few-shot demonstration pool per task, from its training split


@dataclass
class Mixture:
    splits: dict[str, list[TemplatedConversation]]
    held_out: dict[str, list[TemplatedConversation]]  # task -> test conversations
    demonstrations: dict[str, list[Example]]  # task -> examples for in-context demonstrations (train split only)
    notes: list[str] = field(default_factory=list)


def _render(task: Task, examples: list[Example], rng: random.Random) -> list[TemplatedConversation]:
    return [rng.choice(task.templates).render(e) for e in examples]


def build_mixture(
    split_seed: int = 0,
    tasks: dict[str, tuple[int, int, int]] | None = None,
    held_out: dict[str, int] | None = None,
    quiet: bool = True,
    examples_of: Callable[[str], list[Example]] | None = None,
) -> Mixture:
    """The instruction mixture ``instruct_mix``.

    Training tasks and examples per split (train / validation / test): sentiment (rotten_tomatoes) 480 / 24 / 40,
    topic (bbc_news) 240 / 12 / 24, headline (bbc_news) 160 / 8 / 16, entities (wnut16) 240 / 12 / 24: 1,120 training
    conversations, test 104. Held out entirely (never trained on; evaluated as ``heldout:<task>``, 100 test examples
    each): tweet_sentiment (3-way, a class the training tasks never name) and open_qa (chatterbot_qa, a task type the
    mixture lacks). Each task's examples are split 80/10/10 by a shuffle seeded with ``split_seed`` (topic and
    headline share the same BBC articles and so the same split: no test article is trained on), the first examples
    of each split are taken, and each example gets one of its task's templates, drawn by a generator seeded with
    ``split_seed``; the mixed splits are then shuffled. The few-shot demonstration pool of every task (held-out ones
    too) is the first 64 examples of that task's own training split; the tuned model trains on examples after
    those, so demonstrations and training examples never coincide. ``examples_of(task)`` replaces reading the
    packaged data (for tests).
    """
    tasks = MIXTURE_TASKS if tasks is None else tasks
    held_out = HELD_OUT_TASKS if held_out is None else held_out
    rng = random.Random(split_seed)
    splits: dict[str, list[TemplatedConversation]] = {"train": [], "validation": [], "test": []}
    held: dict[str, list[TemplatedConversation]] = {}
    demonstrations: dict[str, list[Example]] = {}
    examples_of = examples_of or (lambda name: TASKS[name].examples(quiet))
    for name in [*tasks, *held_out]:
        task = TASKS[name]
        examples = examples_of(name)
        parts = assign_splits({"all": examples}, split_seed, [])
        demonstrations[name] = parts["train"][:DEMONSTRATIONS]
        if name in held_out:
            held[name] = _render(task, parts["test"][: held_out[name]], rng)
            continue
        for split, n in zip(("train", "validation", "test"), tasks[name], strict=True):
            chosen = parts[split][DEMONSTRATIONS:] if split == "train" else parts[split]
            splits[split].extend(_render(task, chosen[:n], rng))
    for split in splits:
        rng.shuffle(splits[split])
    notes = [
        "instruct_mix: tasks "
        + ", ".join(f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in tasks.items())
        + "; held out: "
        + ", ".join(f"{k} ({n} test)" for k, n in held_out.items())
        + f"; split_seed={split_seed}"
    ]
    return Mixture(splits, held, demonstrations, notes)
