"""The device bundle: everything a GPU machine without spaCy needs to train a gist writer, planned here.

A GPU machine (see docs/gpu.md) has torch, transformers and safetensors but no spaCy and no package registry,
and takes at most 64 MiB of files per job. Sentence splitting and anchor selection (`GistModel.plan`, the only
step that needs spaCy) therefore run here, on CPU; the bundle carries the result as token-id tensors:

- `bundle.safetensors.gz`: one flat table of token ids for every distinct (normalised) text, and per *plan set*
  (one `GistConfig` as far as planning goes: compressor, anchors, target ratio, ...) the pieces, anchors, rows
  per piece and character spans of each text it covers; the continuation ids of the `cont` objective and the
  answer ids of the QA items (to check that the tokenizer over there encodes as this one did);
- `manifest.json.gz`: the texts, the plan-set configs, the training items (QA items and continuation pairs),
  the dev items and held-out items for the report at the end, the `TrainConfig` recipe and the base model's
  identity (a digest of its weights and its `base_fingerprint` as computed here).

Never pickle: tensors in safetensors, the rest in json.

On the other side, `DeviceBundle.install(gm)` replaces `gm.plan` with a lookup in the bundle (a text/config the
bundle lacks is an error naming both), and `no_spacy_splitter()` lets a `GistModel` be built where spaCy cannot be
imported. The base weights travel in parts of < 60 MiB (`pack_gguf`: the embedded Q4_1 GGUF's raw blocks split
by tensor groups, dequantised over there by `load_packed_base` exactly as transformers' GGUF loader does here;
`pack_state_dict` for any other base, e.g. the tiny test model).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

BUNDLE_VERSION = 1
PACK_VERSION = 1
BUNDLE_TENSORS = "bundle.safetensors.gz"
BUNDLE_MANIFEST = "manifest.json.gz"
PACK_META = "pack.json"
PART_LIMIT = 60 * 2**20  # what one part may weigh (the device takes 64 MiB per job, working tree included)

#: GistConfig fields that decide a plan (everything `make_plan` reads).
PLAN_FIELDS = (
    "target_ratio", "gists_per_sentence", "max_sentence_tokens", "anchors", "max_anchor_fraction", "anchor_budget",
    "max_anchors_per_sentence", "compressor", "pool_chunk", "splitter", "spacy_model", "language",
)  # fmt: skip


class BundleError(ValueError):
    """A bundle or packed base is missing, damaged, or lacks what was asked of it."""


# --------------------------------------------------------------------------------------------------------------
# plan sets


def plan_key(config: Any) -> str:
    """The planning identity of a `GistConfig` (or its dict): the fields that decide a plan, as sorted json."""
    d = config if isinstance(config, dict) else config.to_dict()
    out = {k: d.get(k) for k in PLAN_FIELDS}
    if out["target_ratio"] is not None:
        out["target_ratio"] = float(out["target_ratio"])
    out["max_anchor_fraction"] = float(out["max_anchor_fraction"])
    return json.dumps(out, sort_keys=True)


def _gz_write(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(data)


def _id_dtype(max_id: int) -> str:
    return "uint16" if max_id < 2**16 else "int32"


def write_bundle(
    out_dir: Union[str, Path],
    *,
    plan_sets: Sequence[tuple[Any, Sequence[Any]]],
    items: Sequence[dict],
    cont_pairs: Sequence[tuple[str, Sequence[int]]],
    answer_ids: Sequence[Sequence[int]],
    train_config: dict,
    base: dict,
    dev_items: Sequence[dict] = (),
    heldout: Optional[dict[str, list[dict]]] = None,
    extra: Optional[dict] = None,
) -> dict:
    """Write a bundle; returns its summary (sizes, counts).

    Args:
        plan_sets: `(GistConfig, plans)` pairs; a text may appear in several sets (its ids are stored once).
        items: Training QA items (dicts, `QAItem.to_dict`).
        cont_pairs: `(context text, continuation ids)` for the continuation objective (contexts planned too).
        answer_ids: Per training item, the ids of `" " + answer` as this tokenizer encodes them.
        train_config: `asdict(TrainConfig)` of the run the device continues.
        base: The base model's identity (`weights_digest`, `base_fingerprint`, `base_ref`, ...).
        dev_items / heldout: Items scored at the end (dev: trainer kinds; held-out: `HeldoutItem` dicts by kind).
    """
    from safetensors.numpy import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    index: dict[str, int] = {}
    ids_of: list[np.ndarray] = []
    sets_meta = []
    tensors: dict[str, np.ndarray] = {}
    max_id = 0
    for si, (config, plans) in enumerate(plan_sets):
        t_idx, pieces, piece_off, spans, n_other, anchors = [], [], [0], [], [], []
        for p in plans:
            j = index.get(p.text)
            if j is None:
                j = index[p.text] = len(texts)
                texts.append(p.text)
                ids_of.append(np.asarray(p.ids, dtype=np.int64))
                max_id = max(max_id, int(p.ids.max()) if len(p.ids) else 0)
            elif not np.array_equal(ids_of[j], p.ids):
                raise BundleError(f"one text tokenised two ways across plan sets: {p.text[:60]!r}")
            t_idx.append(j)
            pieces.extend(p.pieces)
            spans.extend(p.char_spans)
            n_other.extend(p.n_other)
            piece_off.append(piece_off[-1] + len(p.pieces))
            anchors.append(np.asarray(p.anchors, dtype=np.uint8))
        pre = f"set{si}."
        tensors[pre + "texts"] = np.asarray(t_idx, dtype=np.int32)
        tensors[pre + "pieces"] = np.asarray(pieces, dtype=np.int32).reshape(-1, 2)
        tensors[pre + "char_spans"] = np.asarray(spans, dtype=np.int32).reshape(-1, 2)
        tensors[pre + "n_other"] = np.asarray(n_other, dtype=np.int32)
        tensors[pre + "piece_off"] = np.asarray(piece_off, dtype=np.int64)
        tensors[pre + "anchors"] = np.packbits(np.concatenate(anchors) if anchors else np.zeros(0, np.uint8))
        cfg = config if isinstance(config, dict) else config.to_dict()
        sets_meta.append({"key": plan_key(cfg), "config": cfg, "n": len(t_idx)})
    lens = np.asarray([len(x) for x in ids_of], dtype=np.int64)
    dt = _id_dtype(max(max_id, max((max(c) for _, c in cont_pairs if len(c)), default=0)))
    tensors["ids"] = (np.concatenate(ids_of) if ids_of else np.zeros(0)).astype(dt)
    tensors["ids_off"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ctx_idx = []
    for ctx, _ in cont_pairs:
        if ctx not in index:
            raise BundleError(f"continuation context not planned in any plan set: {ctx[:60]!r}")
        ctx_idx.append(index[ctx])
    tensors["cont.ctx"] = np.asarray(ctx_idx, dtype=np.int32)
    tensors["cont.ids"] = np.asarray([t for _, c in cont_pairs for t in c], dtype=dt)
    tensors["cont.off"] = np.concatenate([[0], np.cumsum([len(c) for _, c in cont_pairs])]).astype(np.int64)
    tensors["answer.ids"] = np.asarray([t for a in answer_ids for t in a], dtype=dt)
    tensors["answer.off"] = np.concatenate([[0], np.cumsum([len(a) for a in answer_ids])]).astype(np.int64)
    manifest = {
        "version": BUNDLE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "texts": texts,
        "plan_sets": sets_meta,
        "items": list(items),
        "dev_items": list(dev_items),
        "heldout": heldout or {},
        "train_config": train_config,
        "base": base,
        **(extra or {}),
    }
    _gz_write(out / BUNDLE_TENSORS, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
    _gz_write(out / BUNDLE_MANIFEST, json.dumps(manifest, ensure_ascii=False).encode("utf-8"))
    size = sum((out / n).stat().st_size for n in (BUNDLE_TENSORS, BUNDLE_MANIFEST))
    return {"dir": str(out), "bytes": size, "texts": len(texts), "tokens": int(lens.sum()),
            "plan_sets": [{"key": json.loads(s["key"]), "n": s["n"]} for s in sets_meta], "items": len(items),
            "cont_pairs": len(cont_pairs), "dev_items": len(dev_items),
            "heldout": {k: len(v) for k, v in (heldout or {}).items()}}  # fmt: skip


class DeviceBundle:
    """A bundle read back: plans by (config, text), training items and continuation pairs, eval items."""

    def __init__(self, path: Union[str, Path]):
        from safetensors.numpy import load

        self.path = Path(path)
        tf, mf = self.path / BUNDLE_TENSORS, self.path / BUNDLE_MANIFEST
        if not tf.is_file() or not mf.is_file():
            raise BundleError(f"{self.path} is not a device bundle ({BUNDLE_TENSORS} / {BUNDLE_MANIFEST} missing)")
        with gzip.open(mf, "rb") as f:
            self.manifest = json.loads(f.read().decode("utf-8"))
        if self.manifest.get("version") != BUNDLE_VERSION:
            raise BundleError(f"{self.path}: bundle version {self.manifest.get('version')}, expected {BUNDLE_VERSION}")
        with gzip.open(tf, "rb") as f:
            self.t = load(f.read())
        self.texts: list[str] = self.manifest["texts"]
        self._text_index = {t: i for i, t in enumerate(self.texts)}
        self._sets = {s["key"]: (i, s) for i, s in enumerate(self.manifest["plan_sets"])}
        self._row: dict[int, dict[int, int]] = {}
        self._anchors: dict[int, np.ndarray] = {}
        self._starts: dict[int, np.ndarray] = {}

    # ---- contents ---------------------------------------------------------------------------------
    @property
    def train_config(self) -> dict:
        return dict(self.manifest["train_config"])

    @property
    def base(self) -> dict:
        return dict(self.manifest["base"])

    def ids(self, j: int) -> np.ndarray:
        off = self.t["ids_off"]
        return self.t["ids"][off[j] : off[j + 1]].astype(np.int64)

    def qa_items(self, which: str = "items") -> list:
        """Training (`items`) or dev (`dev_items`) QA items as `QAItem`s."""
        from gist_memory.train.trainer import QAItem  # the trainer's own QAItem, wherever it lives

        return [QAItem.from_dict(d) for d in self.manifest[which]]

    def heldout_items(self, n: Optional[int] = None) -> dict[str, list]:
        from gist_memory.eval.heldout.items import HeldoutItem

        return {k: [HeldoutItem.from_dict(d) for d in v[:n]] for k, v in self.manifest.get("heldout", {}).items()}

    def cont_pairs(self) -> list[tuple[str, list[int]]]:
        ctx, ids, off = self.t["cont.ctx"], self.t["cont.ids"], self.t["cont.off"]
        return [(self.texts[int(ctx[i])], ids[off[i] : off[i + 1]].astype(np.int64).tolist()) for i in range(len(ctx))]

    def answer_ids(self) -> list[list[int]]:
        ids, off = self.t["answer.ids"], self.t["answer.off"]
        return [ids[off[i] : off[i + 1]].astype(np.int64).tolist() for i in range(len(off) - 1)]

    def plan_keys(self) -> list[str]:
        return list(self._sets)

    # ---- plans ------------------------------------------------------------------------------------
    def has(self, config: Any) -> bool:
        return plan_key(config) in self._sets

    def plan(self, config: Any, text: str):  # noqa: ANN201 - Plan
        """The plan the bundle holds for `text` (normalised here) under `config`; BundleError if it has none."""
        from gist_memory.model.plan import Plan
        from gist_memory.text.split import normalize_text

        key = plan_key(config)
        if key not in self._sets:
            raise BundleError(f"the bundle has no plans for config {key} (it has: {list(self._sets)})")
        si, _ = self._sets[key]
        norm = normalize_text(text)
        j = self._text_index.get(norm)
        rows = self._rows(si)
        if j is None or j not in rows:
            raise BundleError(f"text not planned in the bundle under {key}: {norm[:80]!r}")
        r = rows[j]
        pre = f"set{si}."
        po = self.t[pre + "piece_off"]
        p0, p1 = int(po[r]), int(po[r + 1])
        ids = self.ids(j)
        a0 = self._anchor_starts(si)[r]
        anchors = self._anchors_of(si)[a0 : a0 + len(ids)].astype(bool)
        return Plan(
            text=norm, ids=ids,
            pieces=[(int(a), int(b)) for a, b in self.t[pre + "pieces"][p0:p1]],
            char_spans=[(int(a), int(b)) for a, b in self.t[pre + "char_spans"][p0:p1]],
            anchors=anchors, n_other=[int(x) for x in self.t[pre + "n_other"][p0:p1]],
        )  # fmt: skip

    def _rows(self, si: int) -> dict[int, int]:
        if si not in self._row:
            self._row[si] = {int(j): r for r, j in enumerate(self.t[f"set{si}.texts"])}
        return self._row[si]

    def _anchor_starts(self, si: int) -> np.ndarray:
        if si not in self._starts:
            off = self.t["ids_off"]
            lens = np.asarray([off[j + 1] - off[j] for j in self.t[f"set{si}.texts"]], dtype=np.int64)
            self._starts[si] = np.concatenate([[0], np.cumsum(lens)])
        return self._starts[si]

    def _anchors_of(self, si: int) -> np.ndarray:
        if si not in self._anchors:
            self._anchors[si] = np.unpackbits(self.t[f"set{si}.anchors"])
        return self._anchors[si]

    def install(self, gm: Any) -> Any:
        """Make `gm.plan` and the plans `compress` makes (training and evaluation) read this bundle (final plans:
        anchors already chosen on CPU); returns `gm`."""
        bundle = self

        def plan(text: str):  # noqa: ANN202
            return bundle.plan(gm.config, text)

        gm.plan = plan
        gm._provisional_plan = plan
        return gm

    def check_tokenizer(self, tokenizer: Any, n: int = 200) -> None:
        """Raise if `tokenizer` encodes texts or answers differently from the one that planned the bundle."""
        items = self.manifest["items"]
        for j in range(0, len(self.texts), max(1, len(self.texts) // n)):
            got = tokenizer(self.texts[j], add_special_tokens=False)["input_ids"]
            if list(got) != self.ids(j).tolist():
                raise BundleError(f"this tokenizer encodes bundle text {j} differently: {self.texts[j][:60]!r}")
        for i, ids in list(enumerate(self.answer_ids()))[:n]:
            got = tokenizer(" " + items[i]["answer"], add_special_tokens=False)["input_ids"]
            if list(got) != ids:
                raise BundleError(f"this tokenizer encodes answer {items[i]['answer']!r} as {got}, bundle: {ids}")


# --------------------------------------------------------------------------------------------------------------
# building a bundle here (needs spaCy)


def build_bundle(
    out_dir: Union[str, Path],
    cfg: Any,
    *,
    model: Any = None,
    items: Optional[Sequence[Any]] = None,
    cont_texts: Optional[Sequence[str]] = None,
    n_cont: int = 4000,
    dev_items: Optional[Sequence[Any]] = None,
    n_dev: int = 60,
    heldout_per_kind: int = 20,
    heldout_ratios: Sequence[float] = (4.0, 8.0),
    heldout_methods: Sequence[str] = ("gist", "gist+anchors", "pool+anchors"),
    log: Callable[[str], None] = print,
) -> dict:
    """Plan a training run's items for the device: `cfg` is the `TrainConfig` the device will run.

    Builds (as the CPU trainer would) the QA items, `n_cont` continuation pairs, and plans every passage at each
    of `cfg.ratios`; plans the dev items (the trainer's eval: gist at 4x and 8x) and `heldout_per_kind` held-out
    items per kind for `heldout_methods` at `heldout_ratios` (`pool+anchors` as the held-out table configures
    it; `gist` = the trained config with anchors off).

    Args:
        model: A `GistModel` to plan with (default: built by `Trainer(cfg)`; only its tokenizer/splitter work).
        items / cont_texts / dev_items: Override the trainer's defaults (tests pass small sets).
    """
    import tempfile

    from gist_memory.config import GistConfig
    from gist_memory.train.trainer import Trainer

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="gm-bundle-"))
    try:
        cfg_here = type(cfg)(**{**asdict(cfg), "out_dir": str(tmp), "stop_at": None, "init_from": None})
        tr = Trainer(cfg_here, model=model, items=list(items) if items is not None else None,
                     eval_items=list(dev_items) if dev_items is not None else None)  # fmt: skip
        if cont_texts is not None:
            tr.cont_texts = list(cont_texts)
        tr._ensure_items()
        m = tr.model
        gbase = m.config.to_dict()
        qa = list(tr.items or [])
        pairs: list[tuple[str, list[int]]] = []
        if cfg.w_cont:
            for text in tr.cont_texts or []:
                if len(pairs) >= n_cont:
                    break
                p = tr.continuation_pair(text)
                if p is not None:
                    pairs.append((m.normalize(p[0]), list(p[1])))
        log(f"items: {len(qa)} QA, {len(pairs)} continuation pairs ({time.perf_counter() - t0:.0f}s)")
        dev = list(tr.eval_set or [])[:n_dev]

        def plans_at(config: GistConfig, texts: Sequence[str]) -> tuple[GistConfig, list]:
            keep = m.config
            m.config = config
            try:
                seen: dict[str, Any] = {}
                for t in texts:
                    norm = m.normalize(t)
                    if norm and norm not in seen:
                        seen[norm] = m.plan(norm)
            finally:
                m.config = keep
            return config, list(seen.values())

        train_texts = [p for it in qa for p in it.passages] + [c for c, _ in pairs]
        sets = [plans_at(GistConfig.from_dict({**gbase, "target_ratio": float(r)}), train_texts) for r in cfg.ratios]
        log(f"planned {len(sets[0][1]) if sets else 0} training texts x {len(sets)} ratios "
            f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
        dev_texts = [p for it in dev for p in it.passages]
        for r in (4.0, 8.0):  # what Trainer.evaluate runs
            sets.append(plans_at(GistConfig.from_dict({**gbase, "target_ratio": r}), dev_texts))
        heldout: dict[str, list[dict]] = {}
        if heldout_per_kind:
            from gist_memory.eval.heldout import build_items
            from gist_memory.eval.heldout.run import pool_config

            ho = build_items(heldout_per_kind, seed=0)
            heldout = {k: [it.to_dict() for it in v] for k, v in ho.items()}
            ho_texts = [p for v in ho.values() for it in v for p in it.passages]
            for r in heldout_ratios:
                for meth in heldout_methods:
                    if meth in ("pool", "pool+anchors"):
                        c = pool_config(meth, float(r))
                    elif meth == "gist":
                        c = GistConfig.from_dict({**gbase, "target_ratio": float(r), "anchors": "none"})
                    else:
                        c = GistConfig.from_dict({**gbase, "target_ratio": float(r)})
                    sets.append(plans_at(c, ho_texts))
        merged: dict[str, tuple[Any, list]] = {}  # one set per planning config (dev and held-out may share)
        for c, plans in sets:
            k = plan_key(c)
            if k in merged:
                have = {p.text for p in merged[k][1]}
                merged[k][1].extend(p for p in plans if p.text not in have)
            else:
                merged[k] = (c, list(plans))
        answer_ids = [m.encode(" " + it.answer) for it in qa]
        train_config = {**asdict(cfg), "ratios": list(cfg.ratios), "kinds": list(cfg.kinds)}
        base = {"base_ref": m.base_ref, **base_identity(m.model), "base_fingerprint": m.base_fingerprint()}
        summary = write_bundle(
            out_dir, plan_sets=list(merged.values()), items=[it.to_dict() for it in qa], cont_pairs=pairs,
            answer_ids=answer_ids, train_config=train_config, base=base, dev_items=[it.to_dict() for it in dev],
            heldout=heldout, extra={"heldout_ratios": [float(r) for r in heldout_ratios],
                                    "heldout_methods": list(heldout_methods)},
        )  # fmt: skip
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# the base model in parts


def weights_digest(model: Any) -> str:
    """sha256 of every parameter and buffer that is saved (names, shapes, fp32 bytes), 24 hex digits."""
    import torch

    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name]
        if not torch.is_floating_point(t):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def base_identity(model: Any) -> dict:
    return {"weights_digest": weights_digest(model), "config": model.config.to_dict()}


# GGUF (llama.cpp) names -> transformers Llama names
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}  # fmt: skip
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
QK = 32  # values per Q4_1 / Q8_0 block


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if parts[0] != "blk" or parts[2] not in _GGUF_BLOCK:
        raise BundleError(f"no transformers name for GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"


def dequantize(raw: np.ndarray, kind: str, shape: Sequence[int]) -> np.ndarray:
    """GGUF blocks (uint8) -> float32 array of `shape` (numpy order), as gguf's own dequantiser computes them."""
    if kind == "F32":
        return raw.view(np.float32).reshape(shape)
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if kind == "Q8_0":
        b = raw.reshape(-1, 2 + QK)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if kind == "Q4_1":
        b = raw.reshape(-1, 4 + QK // 2)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = b[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(shape)
    raise BundleError(f"GGUF tensor type {kind} is not supported here (Q4_1, Q8_0, F16, F32 are)")


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (as transformers' GGUF loader does)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _split_groups(sizes: list[tuple[str, int]], limit: int, n_min: int = 1,
                  last_limit: Optional[int] = None) -> list[list[str]]:  # fmt: skip
    """Tensors (in order) into consecutive groups of at most `limit` bytes.

    Without `last_limit`: at least `n_min` groups, as few as the limit allows, balanced by bytes. With it: the
    last group holds at most `last_limit` (it travels with the bundle), filled from the end, the others up to
    `limit` each (fewest groups for a contiguous split).
    """
    total = sum(s for _, s in sizes)
    if last_limit is not None:
        groups: list[list[str]] = [[]]
        acc, cap = 0, last_limit
        for name, s in reversed(sizes):
            if s > limit:
                raise BundleError(f"tensor {name} ({s} bytes) is larger than a part may be ({limit})")
            if groups[-1] and acc + s > cap:
                groups.append([])
                acc, cap = 0, limit
            elif not groups[-1] and s > cap:  # not even one tensor fits beside the bundle
                groups.append([])
                acc, cap = 0, limit
            groups[-1].append(name)
            acc += s
        return [list(reversed(g)) for g in reversed(groups) if g]
    n = max(1, n_min, math.ceil(total / limit))
    while True:
        target = total / n
        groups = [[]]
        acc = 0
        for name, s in sizes:
            if groups[-1] and (acc + s > limit or (acc >= target and len(groups) < n)):
                groups.append([])
                acc = 0
            groups[-1].append(name)
            acc += s
        if all(sum(dict(sizes)[x] for x in g) <= limit for g in groups):
            return groups
        n += 1


def _save_parts(out: Path, tensors: dict[str, np.ndarray], meta: dict, limit: int, sidecar: Path,
                n_min: int = 1, last_limit: Optional[int] = None) -> dict:
    from safetensors.numpy import save_file

    names = list(tensors)
    room = min(2**20, limit // 16)  # safetensors headers
    groups = _split_groups([(k, tensors[k].nbytes) for k in names], limit - room, n_min,
                           None if last_limit is None else last_limit - room)
    groups = [g for g in groups if g]
    parts = []
    for i, g in enumerate(groups, 1):
        fn = f"base-part{i}.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in g}, str(out / fn))
        data = (out / fn).read_bytes()
        parts.append({"file": fn, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tensors": len(g)})
    meta = {**meta, "version": PACK_VERSION, "parts": parts}
    sidecar.mkdir(parents=True, exist_ok=True)
    (sidecar / PACK_META).write_text(json.dumps(meta, indent=1))
    return meta


_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")  # fmt: skip


def _copy_side(src: Path, sidecar: Path) -> None:
    """Config and tokenizer files (tokenizer.json gzipped: ~4x smaller) into the sidecar folder."""
    sidecar.mkdir(parents=True, exist_ok=True)
    for n in _SIDE_FILES:
        f = src / n
        if f.is_file():
            if n == "tokenizer.json":
                _gz_write(sidecar / (n + ".gz"), f.read_bytes())
            else:
                shutil.copy2(f, sidecar / n)


def pack_gguf(gguf_path: Union[str, Path], hf_dir: Union[str, Path], out_dir: Union[str, Path],
              sidecar: Union[str, Path], identity: dict, limit: int = PART_LIMIT,
              n_min: int = 1, last_limit: Optional[int] = None) -> dict:  # fmt: skip
    """The GGUF's raw tensor blocks in safetensors parts under `limit` bytes (+ config/tokenizer in `sidecar`).

    `hf_dir` is the converted copy (config and tokenizer files come from there); `identity` (`base_identity`
    of the converted model, plus `base_fingerprint`/`base_ref`) lets the other side check what it rebuilt.
    """
    import gguf  # here only: the device has none

    r = gguf.GGUFReader(str(gguf_path))
    tensors, spec = {}, {}
    for t in r.tensors:
        kind = t.tensor_type.name
        shape = [int(x) for x in reversed([int(v) for v in t.shape])]  # numpy order (rows, cols)
        tensors[t.name] = np.asarray(t.data).reshape(-1).view(np.uint8).copy()
        spec[t.name] = {"type": kind, "shape": shape, "hf": hf_name(t.name)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _copy_side(Path(hf_dir), Path(sidecar))
    return _save_parts(out, tensors, {"format": "gguf", "tensors": spec, **identity}, limit, Path(sidecar), n_min,
                       last_limit)


def pack_state_dict(hf_dir: Union[str, Path], out_dir: Union[str, Path], sidecar: Union[str, Path],
                    identity: dict, limit: int = PART_LIMIT, n_min: int = 1) -> dict:  # fmt: skip
    """Any safetensors base (e.g. the tiny test model) as parts under `limit` bytes, tensors as saved."""
    from safetensors.numpy import load_file

    src = Path(hf_dir)
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    spec = {k: {"type": str(v.dtype), "shape": list(v.shape), "hf": k} for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _copy_side(src, Path(sidecar))
    return _save_parts(out, tensors, {"format": "state_dict", "tensors": spec, **identity}, limit, Path(sidecar),
                       n_min)


def find_parts(meta: dict, dirs: Sequence[Union[str, Path]]) -> dict[str, Path]:
    """Where each part of a packed base is (first of `dirs` holding a copy of the right size)."""
    found = {}
    for p in meta["parts"]:
        for d in dirs:
            f = Path(d) / p["file"]
            if f.is_file() and f.stat().st_size == p["bytes"]:
                found[p["file"]] = f
                break
        else:
            raise BundleError(f"base part {p['file']} ({p['bytes']} bytes) is in none of {list(map(str, dirs))}: "
                              "upload it first (docs/gpu.md)")  # fmt: skip
    return found


def load_packed_base(sidecar: Union[str, Path], part_dirs: Sequence[Union[str, Path]], dtype: Any = None,
                     device: str = "cpu", check: bool = True):  # noqa: ANN201  # fmt: skip
    """(model, tokenizer, meta) rebuilt from the parts; with `check`, the weights digest must match the pack's."""
    import tempfile

    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    side = Path(sidecar)
    meta = json.loads((side / PACK_META).read_text())
    found = find_parts(meta, part_dirs)
    tok_dir = Path(tempfile.mkdtemp(prefix="gm-base-"))
    for f in side.iterdir():
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as g:
                (tok_dir / f.name[:-3]).write_bytes(g.read())
        elif f.name != PACK_META:
            shutil.copy2(f, tok_dir / f.name)
    config = AutoConfig.from_pretrained(str(tok_dir))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sd: dict[str, torch.Tensor] = {}
    spec = meta["tensors"]
    for p in meta["parts"]:
        raw = load_file(str(found[p["file"]]))
        for name, arr in raw.items():
            s = spec[name]
            if meta["format"] == "gguf":
                w = dequantize(arr, s["type"], s["shape"])
                if name.endswith("attn_q.weight"):
                    w = _reverse_permute(w, config.num_attention_heads)
                elif name.endswith("attn_k.weight"):
                    w = _reverse_permute(w, config.num_key_value_heads)
                sd[s["hf"]] = torch.from_numpy(np.ascontiguousarray(w))
            else:
                sd[s["hf"]] = torch.from_numpy(np.ascontiguousarray(arr))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    res = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [n for n in res.missing_keys if n not in tied]
    if missing or res.unexpected_keys:
        raise BundleError(f"packed base does not fit its config: missing {missing[:5]}, "
                          f"unexpected {list(res.unexpected_keys)[:5]}")
    if tied:
        model.tie_weights()
    model.eval()
    digest = weights_digest(model)
    meta["weights_digest_here"] = digest
    if check and meta.get("weights_digest") and digest != meta["weights_digest"]:
        raise BundleError(f"rebuilt base weights digest {digest} != packed {meta['weights_digest']}")
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    return model, tok, meta


# --------------------------------------------------------------------------------------------------------------
# a GistModel where spaCy cannot be imported


class _BundleOnlySplitter:
    """Stands in for the spaCy splitter on a machine without spaCy: every plan comes from the bundle."""

    def __init__(self, *a: Any, **k: Any):
        pass

    @classmethod
    def from_config(cls, config: Any) -> _BundleOnlySplitter:  # noqa: ARG003
        return cls()

    def split(self, text: str) -> list:  # noqa: ARG002
        raise BundleError("no sentence splitter here (spaCy is not installed): plans must come from the bundle")

    def __getattr__(self, name: str) -> Any:
        raise BundleError(f"no sentence splitter here (asked for {name!r}): plans must come from the bundle")


@contextlib.contextmanager
def no_spacy_splitter() -> Iterator[None]:
    """Inside, `GistModel(...)` builds without spaCy (its splitter raises if ever used)."""
    import gist_memory.model.gist_model as gmod

    keep = gmod.SentenceSplitter
    gmod.SentenceSplitter = _BundleOnlySplitter  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        gmod.SentenceSplitter = keep  # type: ignore[misc]


def gz_json(path: Union[str, Path]) -> Any:
    with gzip.open(path, "rb") as f:
        return json.load(io.TextIOWrapper(f, encoding="utf-8"))
