"""`GistConfig`: everything that decides how a passage becomes a gist state.

Two models with different configs write different states, so the config is part of every cache key
(`GistConfig.fingerprint`). Saved as `gist_config.json` next to the adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

CONFIG_NAME = "gist_config.json"

COMPRESSORS = ("gist", "pool", "pool+anchors")
POSITION_MODES = ("gapped", "packed")
WRITE_HEADS = ("none", "template")
ANCHOR_POLICIES = ("none", "entities", "capitalized", "surprisal", "capitalized+surprisal", "recall",
                   "capitalized+recall")
# policies whose ranking needs the base model's own reading of the text (surprisal from pass 1; recall from an extra pass)
SCORED_ANCHOR_POLICIES = ("surprisal", "capitalized+surprisal", "recall", "capitalized+recall")
RECALL_ANCHOR_POLICIES = ("recall", "capitalized+recall")
HEAD_BUDGETS = ("even", "layer", "global", "depth")
SPLITTERS = ("sentencizer", "senter")

AnchorFn = Callable[[str], list[tuple[int, int]]]
"""A custom anchor policy: sentence text -> character spans (start, end) whose tokens keep raw K/V."""


@dataclass
class GistConfig:
    """How texts are split, how many gist/anchor rows each sentence keeps, and how states are placed.

    Args:
        gists_per_sentence: The paper's N_g: gist tokens after every sentence (used when `target_ratio` is None).
        target_ratio: If set, the number of kept rows (gists + anchors) of each sentence is chosen from its
            length so the whole text lands near `raw tokens / kept rows = target_ratio`.
        max_sentence_tokens: A sentence longer than this is cut into pieces, each with its own gists.
        anchors: Which raw tokens of a sentence keep their own K/V beside the gists: `none` (the paper),
            `entities` (numbers, dates, codes and capitalised names; spaCy NER spans too when the splitter
            pipeline has an `ner` component), `capitalized` (capitalised words and numbers), `surprisal`
            (training-free importance: whole words ranked by how surprising the base model found them while
            reading the text, i.e. the summed -log p of their tokens, taken from the compression's own first
            pass), `capitalized+surprisal` (the capitalised rule first, the rest of the anchor budget by
            surprisal), `recall` (training-free importance: whole words ranked by the attention the base model
            pays their tokens while asked to reproduce the text, as KVzip scores rows, but one ranking shared by
            every layer and head; costs an extra forward of about twice the text at ingest), `capitalized+recall`
            (the capitalised rule first, the rest by recall), or a callable
            `text -> [(start, end), ...]` (not serialisable; such a config cannot be saved).
        head_anchors: With `anchors="recall"` (or `"capitalized+recall"`: the capitalised words and numbers then stay
            in every head and only the rest is chosen per head): each layer's key/value head keeps its own raw tokens, the ones that
            head itself attends to most while the text is repeated (KVzip's per-head scoring, with the same number
            of rows in every head), instead of one set of words shared by all heads. Same rows per passage, same
            bytes; the kept positions then differ per head (`GistState.positions` is (L, H, T)).
        head_anchor_fraction: With `head_anchors`: the share of each passage's anchor rows that every head chooses
            for itself; the rest are the plan's best-scored anchor tokens, kept in every head (binding a value to its
            subject may need the same words in all heads).
        head_budget: With `head_anchors`: how the anchor rows are spread over heads. `even` (every head of every
            layer keeps the same number), `layer` (each layer's budget goes to its heads' best-scored tokens
            together, so a head that attends to many tokens keeps more of them than one that attends to few), or
            `global` (one ranking across all layers and heads, as KVzip does). Uneven counts are padded to the
            widest head; the padding is masked where states are read and not stored at rest. `depth`: the global
            ranking decides how many rows each layer gets and that layer's heads split them evenly, so layers differ
            in width but no head is padded: the reader's cache holds exactly the rows kept (`GistState.num_positions`
            equals `num_rows`).
        head_budget_cap: With an uneven `head_budget`: no head keeps more than this many times the even count
            (bounds the width of the spliced cache, which is the widest head's).
        head_budget_cap_ratio: With `target_ratio`: the ratio `head_budget_cap` is stated at. At another target
            ratio the cap scales with `target_ratio / head_budget_cap_ratio`, so the most rows one head may keep stay
            the same share of the passage at every ratio (the even count halves from 4x to 8x; a fixed multiple of it
            would halve the widest head too). None: the same multiple of the even count at every ratio.
        max_anchor_fraction: With `target_ratio`, at most this share of the row budget goes to anchors (of the
            whole text's budget with `anchor_budget="passage"`, of each sentence's with `"sentence"`).
        anchor_budget: With `target_ratio` and anchors: `passage` (default) ranks anchor candidates across the
            whole text (numbers and codes first, then names, earlier first; whole words where they fit) against
            one shared budget, so a sentence holding a code can keep all of it while plain sentences keep only
            gists; `sentence` caps anchors inside each sentence's own budget (what adapters trained before 0.2
            saw).
        max_anchors_per_sentence: With fixed `gists_per_sentence`, the cap on anchors per sentence.
        compressor: `gist` (learned gist tokens), `pool` (training-free mean pooling of each sentence's K/V
            in chunks) or `pool+anchors` (anchors kept raw, the rest pooled).
        pool_chunk: Tokens per pooled row for `pool`/`pool+anchors` when `target_ratio` is None.
        gist_token_template: Gist token strings are `template.format(i)` for slot i of a sentence.
        num_gist_tokens: How many distinct gist tokens the vocabulary gets (slot i >= num uses the last one).
        splitter: `sentencizer` (rule-based, `spacy.blank`) or `senter` (a trained pipeline, see `spacy_model`).
        spacy_model: Name or path of a spaCy pipeline for `senter` (and NER anchors).
        language: spaCy language code for `spacy.blank`.
        position_mode: `gapped` keeps each kept row at its position in the interleaved text (the paper);
            `packed` renumbers kept rows consecutively when states are spliced.
        window_tokens: A text longer than this is compressed as consecutive windows: sentences see the kept
            rows of their own window only (as if each window were its own passage), so compression cost stays
            linear in length; positions continue across windows and the result is still one state.
        write_head: What the writer reads before each text (then drops): `none` reads the text alone from its first
            token, so that token takes the attention-sink share a sequence's first token gets; `template` reads it
            after the prompt head the reader puts before states (the chat template's opening, with its default
            system prompt), so a text's raw rows are those the reader would have cached with the text in its
            prompt (the one-passage table's `apart` row equals full text only with `template`).
    """

    gists_per_sentence: int = field(default=4, metadata={"help": "N_g gist tokens after each sentence"})
    target_ratio: Optional[float] = field(default=None, metadata={"help": "raw tokens per kept row"})
    max_sentence_tokens: int = field(default=64, metadata={"help": "cut longer sentences into pieces"})
    anchors: Union[str, AnchorFn] = field(default="none", metadata={"help": "anchor policy"})
    head_anchors: bool = field(default=False, metadata={"help": "recall anchors chosen per layer and head"})
    head_anchor_fraction: float = field(default=1.0, metadata={"help": "share of anchors chosen per head"})
    head_budget: str = field(default="even", metadata={"help": "even | layer | global | depth"})
    head_budget_cap: float = field(default=4.0, metadata={"help": "most rows per head, times the even count"})
    head_budget_cap_ratio: Optional[float] = field(
        default=None, metadata={"help": "target ratio the cap is stated at (it scales with the ratio); None: fixed"})
    max_anchor_fraction: float = field(default=0.5, metadata={"help": "share of budget for anchors"})
    anchor_budget: str = field(default="passage", metadata={"help": "passage | sentence"})
    max_anchors_per_sentence: int = field(default=8, metadata={"help": "anchor cap with fixed N_g"})
    compressor: str = field(default="gist", metadata={"help": "gist | pool | pool+anchors"})
    pool_chunk: int = field(default=4, metadata={"help": "tokens per pooled row"})
    gist_token_template: str = field(default="<gist_{}>", metadata={"help": "gist token strings"})
    num_gist_tokens: int = field(default=8, metadata={"help": "distinct gist tokens"})
    splitter: str = field(default="sentencizer", metadata={"help": "sentencizer | senter"})
    spacy_model: Optional[str] = field(default=None, metadata={"help": "spaCy pipeline for senter/NER"})
    language: str = field(default="en", metadata={"help": "spaCy language for the blank pipeline"})
    position_mode: str = field(default="gapped", metadata={"help": "gapped | packed"})
    window_tokens: int = field(default=4096, metadata={"help": "raw tokens per visibility window"})
    write_head: str = field(default="none", metadata={"help": "none | template: what the writer reads first"})

    def __post_init__(self) -> None:
        if self.target_ratio is not None:
            self.target_ratio = float(self.target_ratio)
            if not self.target_ratio >= 1.0:
                raise ValueError(f"target_ratio must be >= 1.0, got {self.target_ratio}")
        if int(self.gists_per_sentence) < 1:
            raise ValueError(f"gists_per_sentence must be >= 1, got {self.gists_per_sentence}")
        if int(self.max_sentence_tokens) < 2:
            raise ValueError(f"max_sentence_tokens must be >= 2, got {self.max_sentence_tokens}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.write_head not in WRITE_HEADS:
            raise ValueError(f"write_head must be one of {WRITE_HEADS}, got {self.write_head!r}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if isinstance(self.anchors, str) and self.anchors not in ANCHOR_POLICIES:
            raise ValueError(f"anchors must be one of {ANCHOR_POLICIES} or a callable, got {self.anchors!r}")
        if not isinstance(self.anchors, str) and not callable(self.anchors):
            raise ValueError("anchors must be a policy name or a callable text -> [(start, end), ...]")
        if self.head_anchors and self.anchors not in RECALL_ANCHOR_POLICIES:
            raise ValueError(f"head_anchors needs anchors='recall' or 'capitalized+recall' (per-head attention "
                             f"scores), got {self.anchors!r}")
        if not 0.0 <= self.head_anchor_fraction <= 1.0:
            raise ValueError(f"head_anchor_fraction must be in [0, 1], got {self.head_anchor_fraction}")
        if self.head_budget not in HEAD_BUDGETS:
            raise ValueError(f"head_budget must be one of {HEAD_BUDGETS}, got {self.head_budget!r}")
        if self.head_budget != "even" and not self.head_anchors:
            raise ValueError(f"head_budget={self.head_budget!r} spreads per-head anchors; it needs head_anchors=True")
        if not float(self.head_budget_cap) >= 1.0:
            raise ValueError(f"head_budget_cap must be >= 1, got {self.head_budget_cap}")
        if self.head_budget_cap_ratio is not None and not float(self.head_budget_cap_ratio) > 0:
            raise ValueError(f"head_budget_cap_ratio must be a ratio > 0 or None, got {self.head_budget_cap_ratio}")
        if self.splitter not in SPLITTERS:
            raise ValueError(f"splitter must be one of {SPLITTERS}, got {self.splitter!r}")
        if self.splitter == "senter" and not self.spacy_model:
            raise ValueError("splitter='senter' needs spacy_model (a spaCy pipeline name or path)")
        if self.anchor_budget not in ("passage", "sentence"):
            raise ValueError(f"anchor_budget must be 'passage' or 'sentence', got {self.anchor_budget!r}")
        if not 0.0 <= self.max_anchor_fraction <= 1.0:
            raise ValueError(f"max_anchor_fraction must be in [0, 1], got {self.max_anchor_fraction}")
        if int(self.window_tokens) < int(self.max_sentence_tokens):
            raise ValueError("window_tokens must be >= max_sentence_tokens")
        if self.pool_chunk < 1 or self.num_gist_tokens < 1 or self.max_anchors_per_sentence < 0:
            raise ValueError("pool_chunk and num_gist_tokens must be >= 1, max_anchors_per_sentence >= 0")
        if "{}" not in self.gist_token_template:
            raise ValueError("gist_token_template must contain '{}' for the slot index")
        if self.compressor == "pool+anchors" and self.anchors == "none":
            self.anchors = "capitalized"
        # enough distinct gist tokens for the largest per-sentence count this config can ask for
        needed = self.gists_per_sentence
        if self.target_ratio is not None:
            needed = -(-self.max_sentence_tokens // max(1, int(self.target_ratio)))
        self.num_gist_tokens = max(int(self.num_gist_tokens), int(needed))

    # ---- derived -------------------------------------------------------------------------------------
    def head_cap(self) -> float:
        """The most rows one head keeps, times the even count, at this config's `target_ratio`
        (`head_budget_cap`, scaled by `target_ratio / head_budget_cap_ratio` when both are set; never below 1)."""
        cap = float(self.head_budget_cap)
        if self.head_budget_cap_ratio is not None and self.target_ratio is not None:
            cap *= float(self.target_ratio) / float(self.head_budget_cap_ratio)
        return max(1.0, cap)

    @property
    def gist_tokens(self) -> list[str]:
        """The gist token strings added to the tokenizer."""
        return [self.gist_token_template.format(i) for i in range(self.num_gist_tokens)]

    @property
    def uses_gist_tokens(self) -> bool:
        """True for the learned compressor (the only one that inserts gist tokens)."""
        return self.compressor == "gist"

    def to_dict(self) -> dict[str, Any]:
        """A json-safe dict; raises if the anchor policy is a callable."""
        if callable(self.anchors):
            raise ValueError("a GistConfig with a callable anchor policy cannot be serialised")
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GistConfig:
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GistConfig keys: {unknown}")
        return cls(**d)

    def fingerprint(self) -> str:
        """sha256 of the settings that change what a state holds (callable policies by qualified name)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["write_head"] == "none":  # what states held before the writer could read a head: the same fingerprint
            del d["write_head"]
        if d["head_budget"] == "even":  # what states held before uneven budgets existed: the same fingerprint
            del d["head_budget"], d["head_budget_cap"]
        if d.pop("head_budget_cap_ratio") is not None and "head_budget" in d:  # what the states hold: the cap at
            d["head_budget_cap"] = self.head_cap()  # this ratio (cap 4 stated at 4x is cap 4 at 4x, cap 8 at 8x)
        if callable(d["anchors"]):
            fn = d["anchors"]
            d["anchors"] = f"callable:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write `gist_config.json` into `directory`."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> GistConfig:
        """Read `gist_config.json` from `directory`."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid json: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} does not hold a json object")
        return cls.from_dict(d)
