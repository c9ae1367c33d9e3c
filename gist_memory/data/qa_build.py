"""Retention QA built honestly from held-out text: planted fictional facts, confusable distractors, swapped cloze.

There is no SQuAD offline, and a 135M model has memorised much of Wikipedia, so the items are made so that only
the context can answer them:

- `planted_single`: one held-out passage with one fictional fact sentence inserted at a random sentence boundary
  ("The Kesterholm archive's catalogue code is QX-4471."); the question asks for it; four choices of the same
  type, none of the wrong ones occurring in the passage.
- `planted_distractors`: four passages, each with a fact of the same form about a different subject ("The
  Harwick archive's ..." / "The Ostmere archive's ..."); the question names one subject and the choices are the
  four planted values, so the model must bind the subject to its value.
- `cloze_swap`: a held-out passage in which one entity (a year, a number, a person, a name, an acronym) is
  replaced everywhere by a same-type fictional substitute; the question is one of its sentences with the
  substitute blanked; choices are the substitute and three others of the same type.

`build_qa(texts, n, kinds, seed)` builds them; the items themselves, their prompts, answer matching and jsonl I/O
are in `gist_memory.data.qa`. Pure Python (no torch).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from gist_memory.data.qa import BLANK, KINDS, QABuildError, QAItem, normalize_answer

# --------------------------------------------------------------------------------------------------------------
# fictional value generators

_FIRST = (
    "Maren Tobias Ilse Corin Edda Jarek Linnea Anselm Brigid Casimir Dagny Emeric Fenna Gideon Halvard Ione Joris "
    "Katrin Leopold Mirela Nils Odile Piet Quentin Rosalind Sten Thea Ulric Vera Wendel Xenia Yannick Zofia Amara "
    "Bastian Celeste Darius Elin Florian Greta Hugo Ines Jonas Lenore Matthias Nadia Oskar Paloma Rafael Solveig "
    "Tamsin Viktor Wilma Aurelio Beatrix Cosmo Delphine Ewald Frida"
).split()
_SUR_A = (
    "Hall Voss Brenn Cald Dorn Ekk Falk Gold Hart Iver Kroll Lind Mar Nord Ost Pell Quill Rud Stein Thal Varn "
    "Wester Ash Bram Crane Drey Elms Fair Hask Tobb"
).split()
_SUR_B = "gren hoff mere wick berg ley ton quist dale strom ford sby holt ridge  ".split(" ")
_PLACE_A = (
    "Kester Vell Ost Marl Brae Dun Hollin Thorn Wrex Carn Ebb Fal Grim Hask Ilm Jor Lark Mor Nethe Orm Pry Quar "
    "Rav Sand Tarn Umber Wyn Yar Zell Ald"
).split()
_PLACE_B = "holm marsh wick mere by stead ford haven dale bury minster port thwaite combe ness wold".split()
_SHIP_A = (
    "Morning Silver Northern Quiet Scarlet Golden Winter Amber Distant Evening Iron Pale Restless Western Crimson "
    "Hidden"
).split()
_SHIP_B = (
    "Heron Star Lantern Tide Falcon Meridian Harbour Comet Swallow Anchor Beacon Compass Osprey Current Willow "
    "Cormorant"
).split()
_MONTHS = "January February March April May June July August September October November December".split()
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXZ"


def fictional_person(rng: random.Random) -> str:
    """A made-up full name (`Maren Vosswick`)."""
    return f"{rng.choice(_FIRST)} {rng.choice(_SUR_A)}{rng.choice(_SUR_B)}"


def fictional_place(rng: random.Random) -> str:
    """A made-up place name (`Kesterholm`)."""
    return rng.choice(_PLACE_A) + rng.choice(_PLACE_B)


def fictional_code(rng: random.Random) -> str:
    """A catalogue-style code (`QX-4471`)."""
    return f"{rng.choice(_CODE_LETTERS)}{rng.choice(_CODE_LETTERS)}-{rng.randint(1000, 9999)}"


def fictional_ship(rng: random.Random) -> str:
    """A ship name (`Morning Heron`)."""
    return f"{rng.choice(_SHIP_A)} {rng.choice(_SHIP_B)}"


def _metres(rng: random.Random) -> str:
    return f"{rng.randint(1000, 4999):,} metres"


def _population(rng: random.Random) -> str:
    return f"{rng.randint(10_000, 99_999):,}"


def _year(rng: random.Random) -> str:
    return str(rng.randint(1820, 1960))


def _frequency(rng: random.Random) -> str:
    return f"{rng.randint(88, 107)}.{rng.randint(1, 9)} MHz"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1820, 1960)}"


def _registry(rng: random.Random) -> str:
    return str(rng.randint(10_000, 99_999))


@dataclass(frozen=True)
class FactTemplate:
    """A fictional fact form: the planted sentence, the question, and the value generator."""

    name: str
    sentence: str  # with {S} (subject) and {V} (value)
    question: str  # with {S}
    value: Callable[[random.Random], str]


FACT_TEMPLATES: tuple[FactTemplate, ...] = (
    FactTemplate("catalogue_code", "The {S} archive's catalogue code is {V}.",
                 "What is the {S} archive's catalogue code?", fictional_code),
    FactTemplate("curator", "The chief curator of the {S} museum in 1912 was {V}.",
                 "Who was the chief curator of the {S} museum in 1912?", fictional_person),
    FactTemplate("altitude", "The {S} weather station sits at an altitude of {V}.",
                 "At what altitude does the {S} weather station sit?", _metres),
    FactTemplate("founded", "The {S} observatory was founded in {V}.",
                 "In what year was the {S} observatory founded?", _year),
    FactTemplate("port", "The {S} expedition set out from the port of {V}.",
                 "From which port did the {S} expedition set out?", fictional_place),
    FactTemplate("engineer", "The {S} bridge was designed by the engineer {V}.",
                 "Which engineer designed the {S} bridge?", fictional_person),
    FactTemplate("population", "The village of {S} had {V} inhabitants at the last census.",
                 "How many inhabitants did the village of {S} have at the last census?", _population),
    FactTemplate("frequency", "The {S} radio station broadcasts on {V}.",
                 "On what frequency does the {S} radio station broadcast?", _frequency),
    FactTemplate("flagship", "The flagship of the {S} shipping company was the {V}.",
                 "What was the name of the {S} shipping company's flagship?", fictional_ship),
    FactTemplate("registry", "The {S} lighthouse is listed under registry number {V}.",
                 "What is the registry number of the {S} lighthouse?", _registry),
    FactTemplate("river", "The {S} mill stands on the banks of the river {V}.",
                 "On which river does the {S} mill stand?", fictional_place),
    FactTemplate("treaty", "The {S} accord was signed on {V}.",
                 "On what date was the {S} accord signed?", _date),
)  # fmt: skip
_TEMPLATES_BY_NAME = {t.name: t for t in FACT_TEMPLATES}


def _occurs(needle: str, text: str) -> bool:
    """Case-insensitive whole-word occurrence."""
    return re.search(r"(?<![\w])" + re.escape(needle) + r"(?![\w])", text, flags=re.I) is not None


def _confusable(a: str, b: str) -> bool:
    na, nb = normalize_answer(a), normalize_answer(b)
    return na == nb or na in nb or nb in na


def _distinct_values(
    rng: random.Random,
    gen: Callable[[random.Random], str],
    n: int,
    avoid_texts: Sequence[str],
    taken: Sequence[str] = (),
) -> list[str]:
    """`n` values from `gen`, pairwise non-confusable, none occurring in `avoid_texts` or confusable with `taken`."""
    out: list[str] = []
    for _ in range(200 * n):
        v = gen(rng)
        if any(_confusable(v, o) for o in [*out, *taken]):
            continue
        if any(_occurs(v, t) for t in avoid_texts):
            continue
        out.append(v)
        if len(out) == n:
            return out
    raise QABuildError(f"could not draw {n} distinct values with {getattr(gen, '__name__', gen)}")


# --------------------------------------------------------------------------------------------------------------
# sentences


_SPLITTER = None


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentence character spans, with the library's sentence splitter (the one the gist model uses)."""
    global _SPLITTER
    if _SPLITTER is None:
        from gist_memory.text import SentenceSplitter

        _SPLITTER = SentenceSplitter()
    return _SPLITTER.split(text)


def insert_sentence(text: str, sentence: str, rng: random.Random) -> tuple[str, int]:
    """Inserts `sentence` at a random sentence boundary of `text`.

    Returns:
        `(new_text, k)`: `k` is how many original sentences precede the inserted one.
    """
    spans = sentence_spans(text)
    k = rng.randint(0, len(spans))
    if k == len(spans):
        return text.rstrip() + " " + sentence, k
    start = spans[k][0]
    return text[:start] + sentence + " " + text[start:], k


# --------------------------------------------------------------------------------------------------------------
# item builders


class _Pool:
    """Hands out passages without reuse until all were used once (then reshuffles)."""

    def __init__(self, texts: Sequence[str], ids: Sequence[str], rng: random.Random):
        self.texts, self.ids, self.rng = texts, ids, rng
        self.order: list[int] = []

    def find(self, make: Callable[[str], Optional[QAItem]], tries: int) -> tuple[Optional[QAItem], int]:
        """The first of the next `tries` unused passages for which `make` builds an item (that one is used)."""
        if not self.order:
            self.order = list(range(len(self.texts)))
            self.rng.shuffle(self.order)
        for pos in range(len(self.order) - 1, max(-1, len(self.order) - 1 - tries), -1):
            i = self.order[pos]
            item = make(self.texts[i])
            if item is not None:
                del self.order[pos]
                return item, i
        return None, -1

    def take(self, k: int) -> list[int]:
        if k > len(self.texts):
            raise QABuildError(f"need {k} distinct passages, have {len(self.texts)}")
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.texts)))
                self.rng.shuffle(self.order)
            i = self.order.pop()
            if i not in out:
                out.append(i)
        return out


def _subjects(rng: random.Random, n: int, avoid_texts: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    return _distinct_values(rng, fictional_place, n, avoid_texts, taken)


def make_planted_single(
    passage: str, rng: random.Random, template: Optional[FactTemplate] = None, item_id: str = ""
) -> QAItem:
    """A `planted_single` item from one passage (see the module docstring).

    Raises:
        QABuildError: No values could be drawn that avoid the passage.
    """
    t = template or rng.choice(FACT_TEMPLATES)
    (subj,) = _subjects(rng, 1, [passage])
    values = _distinct_values(rng, t.value, 4, [passage], taken=[subj])
    answer = values[0]
    fact = t.sentence.format(S=subj, V=answer)
    text, k = insert_sentence(passage, fact, rng)
    choices = values[:]
    rng.shuffle(choices)
    return QAItem(
        id=item_id, kind="planted_single", passages=[text], question=t.question.format(S=subj), answer=answer,
        choices=choices, answer_index=choices.index(answer), answer_passage=0, subject=subj,
        meta={"template": t.name, "fact": fact, "inserted_after_sentences": k},
    )  # fmt: skip


def make_planted_distractors(
    passages: Sequence[str], rng: random.Random, template: Optional[FactTemplate] = None, item_id: str = ""
) -> QAItem:
    """A `planted_distractors` item from (usually four) passages, one confusable fact planted in each.

    Raises:
        QABuildError: Fewer than two passages, or no values/subjects could be drawn that avoid them.
    """
    if len(passages) < 2:
        raise QABuildError("planted_distractors needs at least two passages")
    t = template or rng.choice(FACT_TEMPLATES)
    n = len(passages)
    subjects = _subjects(rng, n, passages)
    values = _distinct_values(rng, t.value, n, passages, taken=subjects)
    texts, positions, facts = [], [], []
    for p, s, v in zip(passages, subjects, values, strict=True):
        fact = t.sentence.format(S=s, V=v)
        new, k = insert_sentence(p, fact, rng)
        texts.append(new)
        positions.append(k)
        facts.append(fact)
    target = rng.randrange(n)
    choices = values[:]
    rng.shuffle(choices)
    answer = values[target]
    return QAItem(
        id=item_id, kind="planted_distractors", passages=texts, question=t.question.format(S=subjects[target]),
        answer=answer, choices=choices, answer_index=choices.index(answer), answer_passage=target,
        subject=subjects[target],
        meta={"template": t.name, "facts": facts, "subjects": subjects, "inserted_after_sentences": positions},
    )  # fmt: skip


# cloze entities -------------------------------------------------------------------------------------------------

_REAL_FIRST = frozenset(
    (
        "Aaron Adam Adolf Albert Alexander Alfred Alice Andrew Anna Anne Antonio Arthur Benjamin Bernard Bill Bob "
        "Carl Carlos Catherine Charles Charlotte Christian Christopher Claude Daniel David Donald Edward Elizabeth "
        "Emily Emma Eric Ernest Francis Frank Franz Frederick George Gustav Harold Harry Helen Henry Herbert Hugh "
        "Isaac Jack Jacob James Jane Jean Joan Johann John Jonathan Joseph Juan Karl Louis Ludwig Margaret Maria "
        "Marie Mark Martin Mary Michael Napoleon Nicholas Oliver Otto Paul Peter Philip Pierre Richard Robert Roger "
        "Ronald Samuel Sarah Simon Stanley Stephen Steven Thomas Victor Vincent Walter William Wolfgang"
    ).split()
)
_NOT_NAMES = frozenset(
    (
        "The A An In On At It Its He She His Her They Their This That These Those There Here When While After Before "
        "During Since Although However Because As By For From With Without Of To And But Or Nor If Then Also Many "
        "Most Some Such One Two Three First Second Later Early Today I We You Our Sir Saint St Mr Mrs Dr "
        "Monday Tuesday Wednesday Thursday Friday Saturday Sunday God Lord English"
    ).split()
    + _MONTHS
)
# capitalised words that are common nouns, titles or generic heads of names ("Hudson River"): never swapped
_GENERIC = frozenset(
    (
        "Earth Sun Moon Government Church State States Empire Republic Kingdom University College School River "
        "War Army Navy Air Force Party Parliament Congress Senate Court Act Prize Award Museum Big Bang Orient "
        "Occident West East North South Western Eastern Northern Southern Old New Great World Internet Bible Greek "
        "Latin Catholic Christian Islam Muslim Jewish Buddhist Hindu Roman Pope King Queen Emperor President Prime "
        "Minister Cup Olympic Games Ocean Sea Mountains Mountain Mount Island Islands Lake Bay Company Street "
        "Bridge Castle Palace Park City County Province Valley Desert Strait Channel Cathedral Temple Revolution "
        "Union United National International Royal Imperial Federal Central General Society Association League "
        "Council Committee Institute Department Ministry Bank Group Series Award Awards Festival Center Centre "
        "Age Ages Period Dynasty Era Century Republic Commonwealth Federation Region Territory District Peninsula "
        "Gulf Coast Basin Plain Plains Hills Forest Falls Canyon Glacier Cape Point Harbour Harbor Port Airport "
        "Station Line Railway Road Avenue Town Village Square Tower Hall House Hospital Library Theatre Theater Club Team "
        "Championship League Cup Trophy Medal Order Day Night Christmas Easter Mass Saints Holy Spirit Father Son "
        "Mother Virgin Prophet Messiah Gospel Testament Psalm Book Chapter Volume Part Section Figure Table"
    ).split()
)
_HEADS = frozenset(
    "River Lake Sea Ocean Bay Island Islands Mountains Bridge Strait Valley Desert Peninsula Gulf Canal".split()
)
_CAP_SEQ = re.compile(r"(?<![\w.'’-])([A-Z][a-z]{2,}(?:\s+[A-Z][a-z]{2,})*)(?![\w'’-])")
_ACRONYM = re.compile(r"(?<![\w.-])([A-Z]{3,5})(?![\w.-])")
_NUMBER = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+|\d{2,})(?![\w/-]|[.,]\d)")


@dataclass
class _Entity:
    text: str
    kind: str  # year | number | person | name | acronym
    start: int  # within the sentence


def _entities(sentence: str) -> list[_Entity]:
    out: list[_Entity] = []
    for m in _NUMBER.finditer(sentence):
        v = m.group(1)
        if "," not in v and len(v) == 4 and 1000 <= int(v) <= 2030:
            out.append(_Entity(v, "year", m.start()))
        elif not v.startswith("0"):
            out.append(_Entity(v, "number", m.start()))
    for m in _CAP_SEQ.finditer(sentence):
        if m.start() == 0:
            continue
        words = m.group(1).split()
        while words and words[0] in _NOT_NAMES:
            words = words[1:]
        if len(words) > 1 and words[-1] in _HEADS:  # "Hudson River" -> swap "Hudson", keep "River"
            words = words[:-1]
        if not words or len(words) > 3 or any(w in _NOT_NAMES or w in _GENERIC for w in words):
            continue
        if len(words) == 1 and re.search(r"\bthe\s+$", sentence[: m.start()]):
            continue  # "the Trinity", "the Devil": mostly capitalised concepts, not names
        if re.search(r"[A-Z][\w.'’-]*\s+$", sentence[: m.start()]):
            continue  # part of a longer capitalised run ("Miguel Gregorio Antonio ..."): no clean boundary
        if len(words) == 1 and re.search(r"(ian|ese|ish|ic|an)$", words[0]):
            continue  # nationality / language adjectives
        if len(words) == 1 and words[0] in _REAL_FIRST:
            continue  # a first name alone: half of a person, swapping it leaves the other half
        text = " ".join(words)
        kind = "person" if len(words) >= 2 and words[0] in _REAL_FIRST else "name"
        if kind == "name" and len(words) > 2:
            continue
        out.append(_Entity(text, kind, m.start() + m.group(1).index(text)))
    for m in _ACRONYM.finditer(sentence):
        if m.start() > 0:
            out.append(_Entity(m.group(1), "acronym", m.start()))
    return out


def _same_type_generator(ent: _Entity) -> Callable[[random.Random], str]:
    if ent.kind == "year":
        y = int(ent.text)

        def gen_year(rng: random.Random) -> str:
            d = rng.randint(3, 60) * rng.choice((-1, 1))
            return str(min(2024, max(1000, y + d)))

        return gen_year
    if ent.kind == "number":
        digits = len(ent.text.replace(",", ""))
        commas = "," in ent.text

        def gen_number(rng: random.Random) -> str:
            v = rng.randint(10 ** (digits - 1), 10**digits - 1)
            return f"{v:,}" if commas else str(v)

        return gen_number
    if ent.kind == "person":
        return fictional_person
    if ent.kind == "acronym":
        n = len(ent.text)
        return lambda rng: "".join(rng.choice(_CODE_LETTERS) for _ in range(n))
    n_words = len(ent.text.split())
    return lambda rng: " ".join(fictional_place(rng) for _ in range(n_words))


def _bounded(s: str) -> re.Pattern[str]:
    if s[0].isdigit():
        return re.compile(r"(?<![\w.,/-])" + re.escape(s) + r"(?![\w/-]|[.,]\d)")
    return re.compile(r"(?<![\w])" + re.escape(s) + r"(?![\w])")


def swap_entity(text: str, entity: str, kind: str, substitute: str) -> Optional[str]:
    """Replaces every occurrence of `entity` in `text` with `substitute` (a person's surname alone too).

    Returns:
        The new text, or None when a clean swap is impossible: the entity also occurs inside longer tokens
        (`1990` in `1990s`) or in another case (`Python` in `python-dev`), or, for a person or multi-word name, a
        part of it would remain.
    """
    pat = _bounded(entity)
    if len(pat.findall(text)) != text.count(entity):
        return None
    new = pat.sub(substitute, text)
    if kind == "person":
        last, sub_last = entity.split()[-1], substitute.split()[-1]
        if text.count(last) != len(_bounded(last).findall(text)):
            return None
        new = _bounded(last).sub(sub_last, new)
    if _remains(entity, new):
        return None
    if kind in ("person", "name") and len(entity.split()) > 1:
        if any(len(w) >= 4 and _remains(w, new) for w in entity.split()):
            return None
    return new


def _remains(entity: str, text: str) -> bool:
    """Whether `entity` still occurs in `text`: digits as a whole number, words in any case, even inside tokens."""
    if entity[0].isdigit():
        return re.search(r"(?<![\d,.])" + re.escape(entity) + r"(?!\d|[.,]\d)", text) is not None
    return entity.casefold() in text.casefold()


ENTITY_TYPES: tuple[str, ...] = ("year", "number", "name", "person", "acronym")


def make_cloze_swap(
    passage: str, rng: random.Random, item_id: str = "", prefer: Optional[str] = None, only: bool = False
) -> Optional[QAItem]:
    """A `cloze_swap` item from one passage, or None when no entity in it can be swapped cleanly.

    Args:
        passage: The passage.
        rng: Random source.
        item_id: The item's id.
        prefer: Entity type to try first (`year`, `number`, `name`, `person`, `acronym`); others follow in random
            order.
        only: Swap only an entity of the `prefer` type.
    """
    spans = sentence_spans(passage)
    cands: list[tuple[int, _Entity]] = []
    for si, (a, b) in enumerate(spans):
        sent = passage[a:b]
        if len(sent.split()) < 8:
            continue
        cands.extend((si, e) for e in _entities(sent))
    rng.shuffle(cands)
    kinds_order = list(ENTITY_TYPES)
    rng.shuffle(kinds_order)
    if prefer in kinds_order:
        kinds_order.remove(prefer)
        kinds_order.insert(0, prefer)
    cands.sort(key=lambda c: kinds_order.index(c[1].kind))  # a random kind first, stable within a kind
    for si, ent in cands:
        if only and ent.kind != prefer:
            continue
        gen = _same_type_generator(ent)
        try:
            vals = _distinct_values(rng, gen, 4, [passage], taken=[ent.text])
        except QABuildError:
            continue
        substitute = vals[0]
        new = swap_entity(passage, ent.text, ent.kind, substitute)
        if new is None or any(_occurs(v, new) for v in vals[1:]):
            continue
        new_spans = sentence_spans(new)
        if len(new_spans) != len(spans):
            continue
        a, b = new_spans[si]
        sent = new[a:b]
        if substitute not in sent:
            continue
        blanked = _bounded(substitute).sub(BLANK, sent)
        if BLANK not in blanked or substitute in blanked:
            continue
        choices = vals[:]
        rng.shuffle(choices)
        return QAItem(
            id=item_id, kind="cloze_swap", passages=[new], question=f"Fill in the blank: {blanked}",
            answer=substitute, choices=choices, answer_index=choices.index(substitute), answer_passage=0,
            meta={"original": ent.text, "entity_type": ent.kind, "sentence_index": si},
        )  # fmt: skip
    return None


def build_qa(
    heldout_texts: Iterable[Union[str, dict]],
    n: int = 200,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    n_distractor_passages: int = 4,
    min_words: int = 30,
    max_words: int = 300,
) -> list[QAItem]:
    """Builds `n` retention QA items from held-out passages, kinds in turn.

    Args:
        heldout_texts: Passages as strings or corpus records (`{"text", "doc_id", ...}`); only those with
            `min_words`..`max_words` words are used. Passages are not reused until all were used once.
        n: Number of items.
        kinds: Kinds to build, in rotation (`planted_single`, `planted_distractors`, `cloze_swap`).
        seed: Seed; the same texts and seed give the same items.
        n_distractor_passages: Passages per `planted_distractors` item.
        min_words: Shortest passage used.
        max_words: Longest passage used.

    Returns:
        The items (ids `<kind>-<number>`).

    Raises:
        QABuildError: Unknown kind, too few usable passages, or items of a kind could not be built.
    """
    for k in kinds:
        if k not in KINDS:
            raise QABuildError(f"unknown QA kind {k!r} (known: {', '.join(KINDS)})")
    if not kinds:
        raise QABuildError("no kinds given")
    texts: list[str] = []
    ids: list[str] = []
    for i, t in enumerate(heldout_texts):
        text = t.get("text", "") if isinstance(t, dict) else t
        if not isinstance(text, str):
            continue
        text = text.strip()
        if min_words <= len(text.split()) <= max_words:
            texts.append(text)
            ids.append(str(t.get("doc_id", i)) if isinstance(t, dict) else str(i))
    need = n_distractor_passages if "planted_distractors" in kinds else 1
    if len(texts) < need:
        raise QABuildError(
            f"need at least {need} passages of {min_words}-{max_words} words to build QA, got {len(texts)}"
        )
    rng = random.Random(seed)
    pool = _Pool(texts, ids, rng)
    items: list[QAItem] = []
    counters = dict.fromkeys(kinds, 0)
    failures = 0
    for i in range(n):
        kind = kinds[i % len(kinds)]
        item: Optional[QAItem] = None
        while item is None:
            if failures > 50 + 5 * n:
                raise QABuildError(f"could not build enough {kind!r} items from {len(texts)} passages")
            item_id = f"{kind}-{counters[kind]:04d}"
            try:
                if kind == "planted_single":
                    (j,) = pool.take(1)
                    item = make_planted_single(texts[j], rng, item_id=item_id)
                    used = [j]
                elif kind == "planted_distractors":
                    js = pool.take(n_distractor_passages)
                    item = make_planted_distractors([texts[j] for j in js], rng, item_id=item_id)
                    used = js
                else:
                    prefer = ENTITY_TYPES[counters[kind] % len(ENTITY_TYPES)]

                    def strict(t: str, item_id: str = item_id, prefer: str = prefer) -> Optional[QAItem]:
                        return make_cloze_swap(t, rng, item_id, prefer, only=True)

                    item, j = pool.find(strict, tries=40)
                    if item is None:
                        (j,) = pool.take(1)
                        item = make_cloze_swap(texts[j], rng, item_id=item_id, prefer=prefer)
                    used = [j]
            except QABuildError:
                item = None
            if item is None:
                failures += 1
                continue
            item.meta["doc_ids"] = [ids[j] for j in used]
        counters[kind] += 1
        items.append(item)
    return items
