"""Held-out evaluation items: kinds, templates and values that the training generators never produce.

The trainer's items (`gist_memory.eval.qa`: planted curators, codes, altitudes, ports, ships, ...; entity-swapped
cloze) all come from one family of sentence templates, one question frame (`Question: ...\\nAnswer:`) and one set
of name/number generators. Everything here is separate from them:

- `entity_single` / `entity_distractors`: a fictional fact about a named subject (a person, a place, a code, a
  year, a length, a count, a weight) planted with **new sentence templates** and **new value generators**
  (other first names and surnames, other place morphemes, another code shape, other year and number ranges), in
  one held-out passage, or in each of four passages (the same template with other subjects and values: the
  question names one subject, so the model must bind subject to value).
- `common_single` / `common_distractors`: the same, but the planted value is an ordinary lowercase word (a
  colour, a material, an animal, a trade, goods) that no capitalisation/number anchor rule selects, so only
  what the compressor itself keeps can answer.
- `faq` (see `gist_memory.eval.heldout.faq`): real questions over real text (the Python FAQ).

Questions are asked in a plain frame (`<question>\\nReply with just the answer.`), not the trainer's frame.
Multiple choice: four values of the template's type (chance 0.25), none of the wrong ones occurring in the
passages (among four passages: the four planted values), each scored as the answer stated in a sentence (the
planted sentence's form with that value: SmolLM2 answers in sentences, and a bare word at the start of a reply
is an unnatural continuation). Free generation: the same question, a greedy answer, scored by exact match and by containment of the
answer. Passages: held-out Wikipedia leads (documents the default corpus split keeps out of training), shipped
in `gist_memory/assets/heldout/wiki_passages.jsonl`. Pure Python (no torch); deterministic given the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "heldout"
WIKI_PASSAGES = ASSETS / "wiki_passages.jsonl"

PLANTED_KINDS: tuple[str, ...] = ("entity_single", "entity_distractors", "common_single", "common_distractors")
KINDS: tuple[str, ...] = (*PLANTED_KINDS, "faq")
ANSWER_FRAME = "{question}\nReply with just the answer."


class HeldoutError(ValueError):
    """Held-out items could not be built or read."""


@dataclass
class HeldoutItem:
    """One held-out item.

    Attributes:
        id: `<kind>-<number>`.
        kind: One of `KINDS`.
        passages: Context passages in reading order.
        question: The question (without the answer frame; `prompt(item)` adds it).
        answer: The reference answer (the planted value; for `faq` the reference answer's first sentence).
        choices: Four candidates for multiple choice (planted kinds), else empty.
        continuations: What is scored for each choice: the answer stated as a sentence (the planted sentence's
            form with that choice as the value), parallel to `choices`.
        answer_index: Index of `answer` in `choices` (-1 when there are none).
        answer_passage: Index of the passage holding the answer.
        key_phrase: What a generated answer must contain to count (planted kinds: the value; faq: a key phrase).
        meta: Provenance (template, planted sentences, subjects, source doc ids, licence).
    """

    id: str
    kind: str
    passages: list[str]
    question: str
    answer: str
    choices: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)
    answer_index: int = -1
    answer_passage: int = 0
    key_phrase: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeldoutItem:
        """Inverse of `to_dict`."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def prompt(item: HeldoutItem) -> str:
    """The question as the reader gets it after the (compressed, raw or absent) context."""
    return ANSWER_FRAME.format(question=item.question)


# --------------------------------------------------------------------------------------------------------------
# values: lists of their own (none shared with gist_memory.eval.qa's generators)

_FIRST = (
    "Alwin Berit Cyrus Dorota Eamon Fiora Gunnar Hedda Ivo Jorunn Kasper Liesel Malte Noemi Orla Pavel Ragna "
    "Saskia Torvald Ulla Valdis Wiebke Yrsa Zeno Agathe Bruno Clemens Dunja Elio Farah Gesa Henrike Ilian Jolanda "
    "Konrad Livia Marek Nanna Osric Perpetua Reinhold Sabine Till Uwe Veronika Wolfram"
).split()
_SURNAMES = (
    "Achterberg Bellingrath Cordes Durrant Eppelmann Frommer Griebel Haller Imhof Jansch Kesselring Lorenzen "
    "Moser Nagelmann Oberle Pfister Reuter Sattler Tietze Unger Vogler Wenzel Zeller Abendroth Brackel Dittmer "
    "Eckhoff Fischbach Gottwald Hinrichs"
).split()
_PLACE_HEAD = (
    "Bramble Cinder Dapple Elder Fennick Glimmer Hazel Juniper Kettle Lantern Mossy Nettle Pebble Quince Rowan "
    "Sorrel Thistle Osier Vetch Yarrow Alder Bracken Clover Dunnock Flint"
).split()
_PLACE_TAIL = "brook crest field gate hollow lea moor reach shaw stow thorpe cliff side well".split()
_CODE_L = "BCDFGHKLMNPRSTVWXZ"

COLOURS = "green yellow purple orange grey brown white black blue red pink violet".split()
MATERIALS = "copper slate tin straw timber lead zinc glass clay stone iron bronze".split()
ANIMALS = "badger heron fox hare stag wolf swan beaver falcon boar lynx raven".split()
TRADES = "baker tailor cooper weaver blacksmith carpenter potter butcher mason saddler brewer tanner".split()
GOODS = "wool salt grain timber coal cotton tea sugar flax hemp tobacco pepper".split()
COMMON_WORD_LISTS: dict[str, list[str]] = {
    "colour": COLOURS, "material": MATERIALS, "animal": ANIMALS, "trade": TRADES, "goods": GOODS,
}  # fmt: skip


def person(rng: random.Random) -> str:
    """A made-up person (`Gunnar Tietze`)."""
    return f"{rng.choice(_FIRST)} {rng.choice(_SURNAMES)}"


def place(rng: random.Random) -> str:
    """A made-up place (`Thistlemoor`)."""
    return rng.choice(_PLACE_HEAD) + rng.choice(_PLACE_TAIL)


def code(rng: random.Random) -> str:
    """A stamp code of another shape than the trainer's (`K4R/318`)."""
    return f"{rng.choice(_CODE_L)}{rng.randint(2, 9)}{rng.choice(_CODE_L)}/{rng.randint(100, 999)}"


def year(rng: random.Random) -> str:
    """A year from another range than the trainer's (1700-1815)."""
    return str(rng.randint(1700, 1815))


def kilometres(rng: random.Random) -> str:
    """A length (`3.7 kilometres`)."""
    return f"{rng.randint(1, 9)}.{rng.randint(1, 9)} kilometres"


def people_count(rng: random.Random) -> str:
    """A small count (`340`)."""
    return str(rng.randint(12, 98) * 10)


def tonnes(rng: random.Random) -> str:
    """A weight (`4.2 tonnes`)."""
    return f"{rng.randint(1, 9)}.{rng.randint(1, 9)} tonnes"


def _word_gen(words: Sequence[str]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(list(words))


@dataclass(frozen=True)
class Template:
    """A held-out fact form: planted sentence with `{S}` (subject) and `{V}` (value), question with `{S}`."""

    name: str
    family: str  # entity | common
    sentence: str
    question: str
    value: Callable[[random.Random], str]
    value_type: str


ENTITY_TEMPLATES: tuple[Template, ...] = (
    Template("treasurer", "entity", "Records from the {S} guild list {V} as its first treasurer.",
             "Who was the first treasurer of the {S} guild?", person, "person"),
    Template("ferry", "entity", "Ferries to the {S} hermitage leave from {V} twice a week.",
             "From where do ferries to the {S} hermitage leave?", place, "place"),
    Template("stamp", "entity", "Every crate packed at the {S} cooperative is stamped {V}.",
             "What stamp is put on crates packed at the {S} cooperative?", code, "code"),
    Template("tunnel", "entity", "The {S} tunnel runs for {V} beneath the ridge.",
             "How long is the {S} tunnel?", kilometres, "length"),
    Template("colony", "entity", "Nesting pairs at the {S} colony were first counted in {V}.",
             "In which year were nesting pairs at the {S} colony first counted?", year, "year"),
    Template("conductor", "entity", "The {S} choir made its first recording under {V}.",
             "Under whose baton did the {S} choir make its first recording?", person, "person"),
    Template("footbridge", "entity", "The {S} footbridge was built to hold {V} people at once.",
             "How many people was the {S} footbridge built to hold at once?", people_count, "count"),
    Template("bell", "entity", "The great bell of the {S} abbey weighs {V}.",
             "How much does the great bell of the {S} abbey weigh?", tonnes, "weight"),
)  # fmt: skip

COMMON_TEMPLATES: tuple[Template, ...] = (
    Template("shutters", "common", "The shutters of the {S} boathouse were painted {V}.",
             "What colour were the shutters of the {S} boathouse painted?", _word_gen(COLOURS), "colour"),
    Template("ribbons", "common", "Pilgrims to the {S} shrine tie {V} ribbons to its gate.",
             "What colour are the ribbons that pilgrims tie to the gate of the {S} shrine?", _word_gen(COLOURS),
             "colour"),
    Template("roof", "common", "The roof of the {S} chapel is covered in {V}.",
             "What is the roof of the {S} chapel covered in?", _word_gen(MATERIALS), "material"),
    Template("banner", "common", "The banner of the {S} rowing club shows a {V}.",
             "Which animal is shown on the banner of the {S} rowing club?", _word_gen(ANIMALS), "animal"),
    Template("innkeeper", "common", "Before opening the {S} inn, its founder worked as a {V}.",
             "What trade did the founder of the {S} inn follow before opening it?", _word_gen(TRADES), "trade"),
    Template("wharf", "common", "Barges leaving the {S} wharf mostly carried {V}.",
             "What did barges leaving the {S} wharf mostly carry?", _word_gen(GOODS), "goods"),
)  # fmt: skip

TEMPLATES: tuple[Template, ...] = ENTITY_TEMPLATES + COMMON_TEMPLATES


# --------------------------------------------------------------------------------------------------------------
# helpers


def normalize(s: str) -> str:
    """Lower case, punctuation and articles dropped, single spaces (SQuAD-style)."""
    s = re.sub(r"[^\w\s]", "", s.lower())
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Normalised equality (after dropping a trailing full stop and surrounding whitespace)."""
    return normalize(prediction) == normalize(answer)


def contains(prediction: str, answer: str) -> bool:
    """Whether the normalised answer occurs as whole words in the normalised prediction."""
    a, p = normalize(answer), normalize(prediction)
    return bool(a) and re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", p) is not None


def _occurs(needle: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", text, flags=re.I) is not None


def _confusable(a: str, b: str) -> bool:
    na, nb = normalize(a), normalize(b)
    return na == nb or na in nb or nb in na


def _draw(rng: random.Random, gen: Callable[[random.Random], str], n: int, avoid: Sequence[str],
          taken: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """`n` pairwise non-confusable values, none occurring in `avoid` texts nor confusable with `taken`."""
    out: list[str] = []
    for _ in range(300 * n):
        v = gen(rng)
        if any(_confusable(v, o) for o in [*out, *taken]) or any(_occurs(v, t) for t in avoid):
            continue
        out.append(v)
        if len(out) == n:
            return out
    raise HeldoutError(f"could not draw {n} distinct values")


_SPLITTER = None


def _sentence_starts(text: str) -> list[int]:
    global _SPLITTER
    if _SPLITTER is None:
        from gist_memory.text import SentenceSplitter

        _SPLITTER = SentenceSplitter()
    return [s for s, _ in _SPLITTER.split(text)]


def plant(text: str, sentence: str, rng: random.Random) -> tuple[str, int]:
    """`text` with `sentence` inserted at a random sentence boundary; returns (new text, sentences before it)."""
    starts = _sentence_starts(text)
    k = rng.randint(0, len(starts))
    if k == len(starts):
        return text.rstrip() + " " + sentence, k
    return text[: starts[k]] + sentence + " " + text[starts[k] :], k


def make_planted(kind: str, passages: Sequence[str], rng: random.Random, item_id: str = "",
                 template: Optional[Template] = None) -> HeldoutItem:  # fmt: skip
    """One planted item of `kind` (`entity_*` or `common_*`; `*_single` takes one passage, `*_distractors` several).

    Raises:
        HeldoutError: Unknown kind, wrong passage count, or values that avoid the passages could not be drawn.
    """
    if kind not in PLANTED_KINDS:
        raise HeldoutError(f"unknown planted kind {kind!r}")
    family, shape = kind.split("_")
    if (shape == "single") != (len(passages) == 1) or not passages:
        raise HeldoutError(f"{kind} got {len(passages)} passages")
    t = template or rng.choice(ENTITY_TEMPLATES if family == "entity" else COMMON_TEMPLATES)
    if t.family != family:
        raise HeldoutError(f"template {t.name!r} is not of the {family} family")
    n = len(passages)
    subjects = _draw(rng, place, n, passages)
    values = _draw(rng, t.value, max(4, n), passages, taken=subjects)
    texts, facts, where = [], [], []
    for p, s, v in zip(passages, subjects, values[:n]):
        fact = t.sentence.format(S=s, V=v)
        new, k = plant(p, fact, rng)
        texts.append(new)
        facts.append(fact)
        where.append(k)
    target = rng.randrange(n)
    answer = values[target]
    # choices: the values planted in the passages come first (so distractors are the other passages' values)
    choices = values[:4]
    rng.shuffle(choices)
    return HeldoutItem(
        id=item_id, kind=kind, passages=texts, question=t.question.format(S=subjects[target]), answer=answer,
        choices=choices, continuations=[t.sentence.format(S=subjects[target], V=c) for c in choices],
        answer_index=choices.index(answer), answer_passage=target, key_phrase=answer,
        meta={"template": t.name, "value_type": t.value_type, "facts": facts, "subjects": subjects,
              "inserted_after_sentences": where},
    )  # fmt: skip


def build_planted(passages: Sequence[Union[str, dict]], kind: str, n: int, seed: int = 0,
                  n_distractor_passages: int = 4, distractor_max_words: int = 90) -> list[HeldoutItem]:  # fmt: skip
    """`n` items of a planted kind from `passages` (strings or `{"text", "doc_id"}` records), deterministic in seed.

    Templates rotate in order; passages are drawn without reuse until all were used once. Items among several
    passages use passages of at most `distractor_max_words` words (when at least `n_distractor_passages` are).

    Raises:
        HeldoutError: Unknown kind or too few passages.
    """
    if kind not in PLANTED_KINDS:
        raise HeldoutError(f"unknown planted kind {kind!r} (known: {', '.join(PLANTED_KINDS)})")
    k = 1 if kind.endswith("_single") else n_distractor_passages
    texts = [p["text"] if isinstance(p, dict) else p for p in passages]
    ids = [str(p.get("doc_id", i)) if isinstance(p, dict) else str(i) for i, p in enumerate(passages)]
    if k > 1:
        short = [i for i, t in enumerate(texts) if len(t.split()) <= distractor_max_words]
        if len(short) >= k:
            texts, ids = [texts[i] for i in short], [ids[i] for i in short]
    if len(texts) < k:
        raise HeldoutError(f"{kind} needs at least {k} passages, got {len(texts)}")
    rng = random.Random(f"{seed}:{kind}")
    templates = ENTITY_TEMPLATES if kind.startswith("entity") else COMMON_TEMPLATES
    order: list[int] = []
    items: list[HeldoutItem] = []
    failures = 0
    while len(items) < n:
        picked: list[int] = []
        while len(picked) < k:
            if not order:
                order = list(range(len(texts)))
                rng.shuffle(order)
            j = order.pop()
            if j not in picked:
                picked.append(j)
        t = templates[len(items) % len(templates)]
        try:
            item = make_planted(kind, [texts[j] for j in picked], rng, f"{kind}-{len(items):04d}", template=t)
        except HeldoutError:
            failures += 1
            if failures > 50 + 5 * n:
                raise
            continue
        item.meta["doc_ids"] = [ids[j] for j in picked]
        items.append(item)
    return items


def load_wiki_passages(path: Optional[Union[str, Path]] = None) -> list[dict]:
    """The shipped held-out Wikipedia passages (`{"text", "doc_id", "title", ...}` per line).

    Raises:
        HeldoutError: The file is missing.
    """
    p = Path(path) if path is not None else WIKI_PASSAGES
    if not p.is_file():
        raise HeldoutError(f"no held-out passages at {p} (rebuild: python -m gist_memory.eval.heldout.build_assets)")
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_items(n: int, seed: int = 0, kinds: Sequence[str] = KINDS,
                passages: Optional[Sequence[Union[str, dict]]] = None,
                faq_items: Optional[Sequence[HeldoutItem]] = None) -> dict[str, list[HeldoutItem]]:  # fmt: skip
    """Up to `n` items per kind: planted kinds from the held-out passages, `faq` from the shipped FAQ asset.

    Args:
        n: Items per kind (the FAQ kind takes a seeded sample of at most `n` of its items).
        seed: Seed.
        kinds: Kinds to build.
        passages: Passages for the planted kinds (default: the shipped held-out Wikipedia passages).
        faq_items: FAQ items (default: the shipped asset).
    """
    out: dict[str, list[HeldoutItem]] = {}
    for kind in kinds:
        if kind not in KINDS:
            raise HeldoutError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if kind == "faq":
            from gist_memory.eval.heldout.faq import load_faq

            pool = list(faq_items) if faq_items is not None else load_faq()
            rng = random.Random(f"{seed}:faq")
            order = list(range(len(pool)))
            rng.shuffle(order)  # a fixed order: the first n of it, so a larger n keeps the smaller set's items
            idx = sorted(order[:n])
            out[kind] = [pool[i] for i in idx]
        else:
            src = passages if passages is not None else load_wiki_passages()
            out[kind] = build_planted(src, kind, n, seed)
    return out
