"""Training a gist writer: the same compress -> splice -> read path as inference, with gradients.

The reader is the frozen base model; only the writer learns (gist embeddings, and a LoRA that acts on the gist
rows of the compression pass). Every text is read once by the base model (no gradient: its rows do not depend on
what is trained), which gives both the anchors and the *teacher*: the same text kept whole (ratio 1.0). The
gist pass then runs with gradients, and the losses compare the reader on the compressed state with the reader
on the whole text.

Objectives (weights in `TrainConfig`):
    cont:    KL(teacher || student) on the continuation of a real passage (the next tokens after the
             compressed part): a signal that carries over to any text.
    distill: KL(teacher || student) on the answer tokens of QA items (the teacher reads every passage whole).
    qa:      cross-entropy on the answer of planted-fact QA items read from their states.
    recon:   fine-grained autoencoding: "repeat the text" answered from one passage's state alone.
Stages: `gist` (gist embeddings only), `lora` (gist embeddings + the writer's LoRA).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from gist_memory.config import GistConfig
from gist_memory.data import QAItem, build_qa, question_prompt
from gist_memory.model import kv

RECON_PROMPT = "Repeat the text above word for word."


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as `train_config.json` so `--resume` can check it."""

    out_dir: str
    base: Optional[str] = None
    gist: dict = field(default_factory=lambda: {"target_ratio": 4.0, "anchors": "capitalized", "max_sentence_tokens": 48})
    ratios: Sequence[float] = (2.0, 4.0, 8.0)
    curriculum: bool = True
    corpus: Optional[str] = None
    steps: int = 400
    batch_items: int = 4
    grad_accum: int = 1
    lr_lora: float = 1e-3
    lr_gist: float = 5e-3
    warmup: int = 20
    stage: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    w_qa: float = 1.0
    w_recon: float = 0.5
    w_distill: float = 0.0
    w_cont: float = 0.0
    # QA over items of several passages read with the answer's passage as raw text after the other passages'
    # states: a state must not outweigh raw text about another subject (what it keeps binds to its own subject)
    w_mixed: float = 0.0
    # several-passage QA items read with the answer's passage last (states and the teacher's rows alike): the
    # order a reader that ranks passages by relevance (`GistModel.focus`) reads them in
    answer_last: bool = False
    cont_items: int = 0
    cont_tokens: int = 48
    recon_tokens: int = 96
    # which passages the reconstruction loss repeats: "qa" (the QA items' answer passages), "cont" (the real
    # passages of the continuation objective) or "both"
    recon_on: str = "qa"
    anchor_dropout: float = 0.0  # share of steps compressed with anchors off: the gists alone carry the values
    kinds: Sequence[str] = ("planted_single", "planted_distractors", "cloze_swap")
    pool_items: int = 3000
    bf16: Optional[bool] = None
    eval_items: int = 60
    eval_every: int = 100
    save_every: int = 50
    snapshot_every: int = 0
    log_every: int = 5
    seed: int = 0
    device: Optional[str] = None
    init_from: Optional[str] = None
    stop_at: Optional[int] = None  # end this run after this step (the schedule still spans `steps`)
    # "base": the reader is the frozen base model (the shipped default). "adapted": the writer's LoRA also acts
    # on the tokens that read states (student side only; the teacher stays the base), for the comparison
    reader: str = "base"

    def __post_init__(self) -> None:
        if self.stage not in ("gist", "lora"):
            raise ValueError(f"stage must be gist or lora; got {self.stage!r} (the reader stays the base model, "
                             "so there is no full-weight stage)")
        if self.reader not in ("base", "adapted"):
            raise ValueError(f"reader must be base or adapted, got {self.reader!r}")
        if self.reader == "adapted" and self.stage != "lora":
            raise ValueError("reader='adapted' needs stage 'lora' (the adapted reader is the writer's LoRA)")
        if self.steps < 1 or self.batch_items < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_items and grad_accum must be >= 1")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be between 1 and steps ({self.steps}), got {self.stop_at}")
        if min(self.w_qa, self.w_recon, self.w_distill, self.w_cont, self.w_mixed) < 0 or (
            self.w_qa + self.w_recon + self.w_distill + self.w_cont + self.w_mixed
        ) <= 0:
            raise ValueError("objective weights must be >= 0 and not all zero")
        if self.recon_on not in ("qa", "cont", "both"):
            raise ValueError(f"recon_on must be qa, cont or both, got {self.recon_on!r}")
        if self.w_recon and self.recon_on != "qa" and self.cont_items < 1:
            raise ValueError(f"recon_on={self.recon_on!r} needs cont_items >= 1 (the passages it repeats)")
        if not 0.0 <= self.anchor_dropout <= 1.0:
            raise ValueError(f"anchor_dropout must be in [0, 1], got {self.anchor_dropout}")
        if self.w_cont and self.cont_items < 1:
            raise ValueError("w_cont > 0 needs cont_items >= 1 (continuation passages per step)")
        GistConfig(**self.gist)  # validate early

    @property
    def uses_cont(self) -> bool:
        """Whether steps draw real passages (continuation KL, or reconstruction of them)."""
        return bool(self.w_cont or (self.w_recon and self.recon_on != "qa"))

    @property
    def uses_qa(self) -> bool:
        """Whether steps draw QA items."""
        return bool(self.w_qa or self.w_distill or self.w_mixed or (self.w_recon and self.recon_on != "cont"))

    def use_bf16(self, device_type: str) -> bool:
        """bf16 autocast: on CUDA by default; on CPU only when asked (AVX2-only CPUs run bf16 ~15x slower)."""
        return bool(self.bf16) if self.bf16 is not None else device_type == "cuda"

    def recipe(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it resumes."""
        d = asdict(self)
        for k in ("out_dir", "steps", "eval_every", "save_every", "snapshot_every", "log_every", "eval_items",
                  "device", "stop_at"):
            d.pop(k)
        if not d["w_mixed"]:  # added in 0.3: recipes saved before it (and runs without it) match as before
            d.pop("w_mixed")
        if not d["answer_last"]:  # likewise
            d.pop("answer_last")
        d["ratios"] = list(d["ratios"])
        d["kinds"] = list(d["kinds"])
        return d


def train_texts(corpus: Optional[str], max_texts: int = 20000) -> list[str]:
    """Training passages: `corpus/train.jsonl` if given, else the Wikipedia leads outside the held-out split."""
    from gist_memory.data import chunk_paragraphs, is_heldout, iter_wiki, load_corpus

    if corpus:
        recs = load_corpus(corpus, "train")
        texts = [r["text"] for r in recs if str(r.get("text", "")).strip()]
    else:
        texts = []
        for d in iter_wiki():
            if is_heldout(d.doc_id, 0.05, 0):
                continue
            texts.extend(chunk_paragraphs(d.paragraphs))
    if not texts:
        raise ValueError(f"no training text in {corpus or 'the Wikipedia leads'}")
    return texts[:max_texts]


class Trainer:
    """Runs a `TrainConfig`: builds the model (or resumes), samples items, optimises, evaluates, checkpoints."""

    def __init__(self, cfg: TrainConfig, model=None, items: Optional[list[QAItem]] = None,  # noqa: ANN001
                 eval_items: Optional[list[QAItem]] = None):
        from gist_memory.model import GistModel

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        gcfg = GistConfig(**{**cfg.gist, "target_ratio": cfg.gist.get("target_ratio") or max(cfg.ratios)})
        # size the gist vocabulary for the smallest ratio the run will use
        gcfg.num_gist_tokens = max(gcfg.num_gist_tokens, -(-gcfg.max_sentence_tokens // int(min(cfg.ratios))))
        r = cfg.lora_r if cfg.stage == "lora" else 0
        self.model = model or GistModel.from_base(cfg.base, gcfg, device=cfg.device, dtype="float32", lora_r=r,
                                                  lora_alpha=cfg.lora_alpha)
        if self.model.writer is None:
            raise ValueError("training needs the gist compressor (GistConfig(compressor='gist'))")
        if cfg.stage == "lora" and not self.model.has_lora:
            raise ValueError("stage 'lora' needs a model built with lora_r > 0")
        self.model.reader_adapted = cfg.reader == "adapted"
        self.gist_config = self.model.config
        self.gist_config_anchors = self.model.config.anchors
        self.step = 0
        self.tokens_done, self.elapsed_done = 0, 0.0  # passage tokens and seconds of the steps done so far
        self.history: list[dict[str, Any]] = []
        self._setup_params()
        self.items = items
        self.cont_texts: Optional[list[str]] = None
        self.eval_set = eval_items
        if not self._resume_if_any() and cfg.init_from:
            self._load_weights(Path(cfg.init_from))  # warm start (e.g. an earlier stage); fresh optimiser

    # ---- parameters --------------------------------------------------------------------------------
    def _setup_params(self) -> None:
        w = self.model.writer
        assert w is not None
        for p in self.model.model.parameters():
            p.requires_grad_(False)  # the reader never learns
        w.gist_embeddings.requires_grad_(True)
        groups = [{"params": [w.gist_embeddings], "lr": self.cfg.lr_gist, "weight_decay": 0.0}]
        lora = [p for p in w.lora.parameters()]
        for p in lora:
            p.requires_grad_(self.cfg.stage == "lora")
        if self.cfg.stage == "lora" and lora:
            groups.append({"params": lora, "lr": self.cfg.lr_lora, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
        self.base_lrs = [g["lr"] for g in groups]

    def _lr_scale(self, step: int) -> float:
        if step < self.cfg.warmup:
            return (step + 1) / self.cfg.warmup
        prog = (step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    # ---- data --------------------------------------------------------------------------------------
    def _ensure_items(self) -> None:
        if self.items is None:
            texts = train_texts(self.cfg.corpus)
            self.items = build_qa(texts, n=self.cfg.pool_items, kinds=self.cfg.kinds, seed=self.cfg.seed + 1)
        if self.cont_texts is None:
            self.cont_texts = train_texts(self.cfg.corpus) if self.cfg.uses_cont else []
            random.Random(self.cfg.seed + 3).shuffle(self.cont_texts)
        if self.eval_set is None:
            from gist_memory.data import load_qa

            dev = Path(__file__).resolve().parent.parent / "assets" / "qa_dev.jsonl"
            self.eval_set = load_qa(dev)[: self.cfg.eval_items] if dev.is_file() else []

    def _ratio(self, step: int) -> float:
        rs = sorted(self.cfg.ratios)
        if not self.cfg.curriculum:
            return random.choice(rs)
        upto = 1 + int(len(rs) * 1.5 * step / max(1, self.cfg.steps))
        return random.choice(rs[: min(len(rs), upto)])

    def continuation_pair(self, text: str) -> Optional[tuple[str, list[int]]]:
        """(context text, continuation ids): the context ends at a sentence boundary past a third of the text,
        the continuation is up to `cont_tokens` tokens after it; None if the text is too short."""
        from gist_memory.data import sentence_spans

        m = self.model
        spans = sentence_spans(text)
        if len(spans) < 2:
            return None
        for _, end in spans[:-1]:
            if end >= len(text) // 3:
                ctx, rest = text[:end].strip(), text[end:].strip()
                cont = m.encode(" " + rest)[: self.cfg.cont_tokens]
                if len(m.encode(ctx)) >= 24 and len(cont) >= 8:
                    return ctx, cont
                return None
        return None

    # ---- losses ------------------------------------------------------------------------------------
    def _answer_logits(self, prompt: str, states, target: list[int], teacher: bool = False) -> torch.Tensor:  # noqa: ANN001
        """Reader logits predicting each target token after `prompt` (chat template) reading `states`
        (`teacher`: always the base reader)."""
        layers, start, head = self.model.prepare(prompt, states)
        ids = torch.as_tensor([head + target], device=self.model.device)
        logits, _ = self.model.forward_ids(ids, layers, start, adapted=False if teacher else None)
        return logits[0, len(head) - 1 : len(head) - 1 + len(target)].float()

    def _cont_logits(self, state, cont: list[int], teacher: bool = False) -> torch.Tensor:  # noqa: ANN001
        """Reader logits over a raw continuation right after one state (no template): predicts cont[1:]."""
        m = self.model
        layers, start = kv.splice(None, 0, [state], m.rope, m.config.position_mode, device=m.device, dtype=m.dtype)
        logits, _ = m.forward_ids(torch.as_tensor([cont], device=m.device), layers, start,
                                  adapted=False if teacher else None)
        return logits[0, :-1].float()

    @staticmethod
    def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean over positions of KL(teacher || student), from logits (T, V)."""
        return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                        reduction="batchmean")

    def losses(self, items: Sequence[QAItem], cont: Sequence[tuple[str, list[int]]] = ()) -> dict[str, torch.Tensor]:
        """Loss terms for one micro-batch (each a dict entry, averaged over its items)."""
        m, c = self.model, self.cfg
        passages = [p for it in items for p in it.passages]
        plans = [m.plan(t) for t in passages + [ctx for ctx, _ in cont]]
        states, twins = m.compress_for_training(plans)
        out: dict[str, list[torch.Tensor]] = {"qa": [], "recon": [], "distill": [], "cont": [], "mixed": []}
        i = 0
        for it in items:
            st, tw = states[i : i + len(it.passages)], twins[i : i + len(it.passages)]
            i += len(it.passages)
            target = m.encode(" " + it.answer)
            if c.answer_last and len(it.passages) > 1:
                a = it.answer_passage
                last = [j for j in range(len(st)) if j != a] + [a]
                st, tw = [st[j] for j in last], [tw[j] for j in last]
            if c.w_qa or c.w_distill:
                s_logits = self._answer_logits(question_prompt(it), st, target)
                if c.w_qa:
                    out["qa"].append(F.cross_entropy(s_logits, torch.as_tensor(target, device=s_logits.device)))
                if c.w_distill:
                    with torch.no_grad():
                        t_logits = self._answer_logits(question_prompt(it), tw, target, teacher=True)
                    out["distill"].append(self._kl(s_logits, t_logits))
            if c.w_mixed and len(it.passages) > 1:
                a = it.answer_passage
                others = [s for j, s in enumerate(states[i - len(it.passages): i]) if j != a]
                x_logits = self._answer_logits(it.passages[a] + "\n\n" + question_prompt(it), others, target)
                out["mixed"].append(F.cross_entropy(x_logits, torch.as_tensor(target, device=x_logits.device)))
            if c.w_recon and c.recon_on != "cont":
                a = it.answer_passage
                rec = m.encode(it.passages[a])[: c.recon_tokens]
                r_logits = self._answer_logits(RECON_PROMPT, [states[i - len(it.passages) + a]], rec)
                out["recon"].append(F.cross_entropy(r_logits, torch.as_tensor(rec, device=r_logits.device)))
        for (ctx, ids), st, tw in zip(cont, states[i:], twins[i:]):
            if c.w_cont:
                with torch.no_grad():
                    t_logits = self._cont_logits(tw, ids, teacher=True)
                out["cont"].append(self._kl(self._cont_logits(st, ids), t_logits))
            if c.w_recon and c.recon_on != "qa":
                rec = m.encode(ctx)[: c.recon_tokens]
                r_logits = self._answer_logits(RECON_PROMPT, [st], rec)
                out["recon"].append(F.cross_entropy(r_logits, torch.as_tensor(rec, device=r_logits.device)))
        return {k: torch.stack(v).mean() for k, v in out.items() if v}

    # ---- loop --------------------------------------------------------------------------------------
    def train(self, progress: bool = True) -> list[dict[str, Any]]:
        """Run until `cfg.steps`; returns the log history (also in `out_dir/log.jsonl`)."""
        self._ensure_items()
        assert self.items is not None
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(asdict(c), indent=2, default=list))
        rng = random.Random(c.seed + 7)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        self.model.model.train()
        t_start, tokens = time.perf_counter(), self.tokens_done  # a resumed run counts on from its checkpoint
        tokens0, elapsed0 = tokens, self.elapsed_done
        bar = _bar(c.steps, self.step, progress)
        if self.eval_set and self.step == 0 and c.eval_every <= c.steps:
            self.evaluate(0)  # the untrained starting point of the learning curve
        end = c.steps if c.stop_at is None else min(c.steps, c.stop_at)
        while self.step < end:
            ratio = self._ratio(self.step)
            self.model.config.target_ratio = ratio
            anchors_kept = self.gist_config_anchors
            if c.anchor_dropout and random.random() < c.anchor_dropout:
                anchors_kept = "none"
            self.model.config.anchors = anchors_kept
            scale = self._lr_scale(self.step)
            for g, lr in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = lr * scale
            self.opt.zero_grad(set_to_none=True)
            # the reader is frozen: the prompt prefix cache stays valid across steps
            logs: dict[str, float] = {}
            for a in range(c.grad_accum):
                micro = self.step * c.grad_accum + a
                idx = [order[(micro * c.batch_items + j) % len(order)] for j in range(c.batch_items)]
                batch = [self.items[j] for j in idx] if c.uses_qa else []
                cont = self._cont_batch(micro)
                with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=c.use_bf16(self.model.device.type)):
                    terms = self.losses(batch, cont)
                    loss = sum(getattr(c, f"w_{k}") * v for k, v in terms.items())
                if isinstance(loss, torch.Tensor):  # (a micro-batch can have no term: e.g. only w_mixed, one passage)
                    (loss / c.grad_accum).backward()
                for k, v in terms.items():
                    logs[k] = logs.get(k, 0.0) + float(v.detach()) / c.grad_accum
                tokens += sum(len(self.model.encode(p)) for it in batch for p in it.passages)
                tokens += sum(len(self.model.encode(ctx)) for ctx, _ in cont)
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
            self.opt.step()
            self.step += 1
            now = time.perf_counter() - t_start
            elapsed = elapsed0 + now
            self.tokens_done, self.elapsed_done = tokens, elapsed
            rec = {"step": self.step, "ratio": ratio, "lr_scale": round(scale, 4), **{k: round(v, 4) for k, v in logs.items()},
                   "tokens": tokens, "tok_per_s": round((tokens - tokens0) / max(now, 1e-9), 1),
                   "elapsed_s": round(elapsed, 1)}
            self._log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()} | {"tok/s": rec["tok_per_s"]})
            if self.step % c.save_every == 0 or self.step == end:
                ck = self.save_checkpoint()
                if c.snapshot_every and (self.step % c.snapshot_every == 0 or self.step == end):
                    self._snapshot(ck, tokens)
            if self.eval_set and (self.step % c.eval_every == 0 or self.step == end):
                self.evaluate(tokens)
        if bar is not None:
            bar.close()
        self.model.model.eval()
        self.model.invalidate_fingerprint()
        return self.history

    def _cont_batch(self, micro: int) -> list[tuple[str, list[int]]]:
        """The continuation passages of micro-batch `micro` (texts too short for a pair are skipped)."""
        c = self.cfg
        if not c.uses_cont or not self.cont_texts:
            return []
        out: list[tuple[str, list[int]]] = []
        j = micro * c.cont_items * 2
        tries = 0
        while len(out) < c.cont_items and tries < 20 * c.cont_items:
            pair = self.continuation_pair(self.cont_texts[j % len(self.cont_texts)])
            j += 1
            tries += 1
            if pair is not None:
                out.append(pair)
        return out

    def evaluate(self, tokens: int = 0) -> dict[str, Any]:
        """Held-out retention (gist states vs full text vs none) at the config's ratio; logged."""
        from gist_memory.eval.retention import evaluate_retention

        assert self.eval_set is not None
        m = self.model
        keep, keep_anchors = m.config.target_ratio, m.config.anchors
        m.config.anchors = self.gist_config_anchors
        res_by_ratio = {}
        m.model.eval()
        try:
            for r in (4.0, 8.0):
                m.config.target_ratio = r
                m.invalidate_fingerprint()
                with torch.no_grad():
                    res = evaluate_retention(m, self.eval_set, methods=("gist",), calibrate=False)
                res_by_ratio[str(r)] = {"acc": round(res.accuracy["gist"], 4), "ratio": round(res.ratio, 2),
                                        "by_kind": res.by_kind}
        finally:
            m.config.target_ratio, m.config.anchors = keep, keep_anchors
            m.invalidate_fingerprint()
            m.model.train()
        rec = {"step": self.step, "tokens": tokens, "eval": res_by_ratio}
        self._log(rec)
        return rec

    def _log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write `out_dir/checkpoint` atomically (model + optimiser + step); the previous one survives a crash."""
        import shutil

        tmp = self.out / ".checkpoint-tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        keep, keep_anchors = self.model.config.target_ratio, self.model.config.anchors
        self.model.config.target_ratio = self.cfg.gist.get("target_ratio") or keep
        self.model.config.anchors = self.gist_config_anchors
        try:
            self.model.save_pretrained(tmp)
        finally:
            self.model.config.target_ratio, self.model.config.anchors = keep, keep_anchors
        torch.save({"opt": self.opt.state_dict(), "step": self.step, "tokens": self.tokens_done,
                    "elapsed_s": float(self.elapsed_done)}, tmp / "trainer_state.pt")
        (tmp / "recipe.json").write_text(json.dumps(self.cfg.recipe(), sort_keys=True, indent=2))
        final = self.out / "checkpoint"
        old = self.out / ".checkpoint-old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
        return final

    def _snapshot(self, ck: Path, tokens: int) -> Path:
        """Keep a copy of the adapter at this step (`out_dir/snapshots/step-N`) for learning curves."""
        import shutil

        snap = self.out / "snapshots" / f"step-{self.step:05d}"
        snap.mkdir(parents=True, exist_ok=True)
        for name in ("gist_adapter.safetensors", "gist_adapter.json", "gist_config.json"):
            shutil.copy2(ck / name, snap / name)
        (snap / "progress.json").write_text(json.dumps({"step": self.step, "tokens": tokens}))
        return snap

    def _resume_if_any(self) -> bool:
        """Continue from `out_dir/checkpoint` if there is one (same recipe required); True if resumed."""
        ck = self.out / "checkpoint"
        if not (ck / "recipe.json").is_file():
            return False
        saved = json.loads((ck / "recipe.json").read_text())
        now = json.loads(json.dumps(self.cfg.recipe(), sort_keys=True))
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ValueError(f"{ck} was written by a run with a different recipe (differs in {diff}); "
                             "use a new out_dir or the same settings")
        self._load_weights(ck)
        st = torch.load(ck / "trainer_state.pt", weights_only=True)  # our own file, tensors only
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])
        self.tokens_done = int(st.get("tokens", 0))  # checkpoints before 0.3 did not keep them: counted from 0
        self.elapsed_done = float(st.get("elapsed_s", 0.0))
        return True

    def _load_weights(self, folder: Path) -> None:
        """Gist embeddings and LoRA matrices from a saved adapter folder into the model being trained."""
        from safetensors.torch import load_file

        f = folder / "gist_adapter.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"no gist adapter at {f}")
        tensors = load_file(str(f))
        w = self.model.writer
        assert w is not None
        if any(k.startswith("lora.") for k in tensors) and not self.model.has_lora:
            raise ValueError(f"{folder} holds LoRA weights but this run's stage is {self.cfg.stage!r}")
        if not any(k.startswith("lora.") for k in tensors) and self.model.has_lora:
            with torch.no_grad():  # a gist-only stage warm-starts a LoRA stage: fresh LoRA, its gist rows
                g = tensors["gist_embeddings"]
                if g.shape != w.gist_embeddings.shape:
                    raise ValueError(f"{folder}: {tuple(g.shape)} gist embeddings, this run has "
                                     f"{tuple(w.gist_embeddings.shape)}")
                w.gist_embeddings.copy_(g)
        else:
            w.load_tensors(tensors, where=str(folder))
        self.model.invalidate_fingerprint()


def _bar(total: int, initial: int, enabled: bool):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
