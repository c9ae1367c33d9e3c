"""Train the frozen-reader gist writer on the bundled SmolLM2 (CPU, fp32), resumable; the recipe of the 0.3 adapter.

    python docs/training/train_writer.py --out runs/writer-v3 --steps 2000 [--stop-at N] [--threads 2]

Same as `gist-memory train` with the options below; kept as a script so a run can be relaunched unchanged.
Snapshots every 25 steps under OUT/snapshots (for the learning curve), a checkpoint every 25 steps (--resume is
automatic: rerun the same command).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--w-qa", type=float, default=0.5)
    ap.add_argument("--w-distill", type=float, default=1.0)
    ap.add_argument("--w-cont", type=float, default=1.0)
    ap.add_argument("--w-recon", type=float, default=0.0)
    ap.add_argument("--w-mixed", type=float, default=0.0,
                    help="QA with the answer's passage raw after the other passages' states (states stay quiet)")
    ap.add_argument("--answer-last", action="store_true",
                    help="several-passage QA items read with the answer's passage last (as a relevance-ordered read)")
    ap.add_argument("--recon-on", choices=("qa", "cont", "both"), default="qa")
    ap.add_argument("--batch-items", type=int, default=2)
    ap.add_argument("--cont-items", type=int, default=4)
    ap.add_argument("--device", default=None)
    ap.add_argument("--anchor-dropout", type=float, default=0.0)
    ap.add_argument("--anchors", default="capitalized",
                    help="anchor policy the writer trains with (capitalized, surprisal, ...)")
    ap.add_argument("--head-anchors", action="store_true",
                    help="with --anchors recall: anchors per layer and head (how the shipped default serves states)")
    ap.add_argument("--head-budget", choices=("even", "layer", "global", "depth"), default=None,
                    help="with --head-anchors: how anchor rows are spread over heads (the shipped default: global)")
    ap.add_argument("--head-budget-cap", type=float, default=None, help="most rows per head, times the even count")
    ap.add_argument("--head-budget-cap-ratio", type=float, default=None,
                    help="the target ratio the cap is stated at (it scales with each step's ratio)")
    ap.add_argument("--write-head", choices=("none", "template"), default=None,
                    help="what the writer reads before each text (template: the reader's prompt head, so the "
                         "uncompressed teacher twin is what the reader caches for the text in its prompt)")
    ap.add_argument("--ratios", default="4,8",
                    help="target ratios a step draws from, comma-separated (repeat one to draw it more often: 4,8,8)")
    ap.add_argument("--reader", choices=("base", "adapted"), default="base",
                    help="adapted: the LoRA also acts where states are read (the frozen-vs-adapted comparison)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from gist_memory.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        out_dir=a.out, steps=a.steps, stop_at=a.stop_at, init_from=a.init_from, device=a.device,
        gist={"target_ratio": 4.0, "anchors": a.anchors, "max_sentence_tokens": 48, "max_anchor_fraction": 0.75,
              **({"head_anchors": True} if a.head_anchors else {}),
              **({"head_budget": a.head_budget} if a.head_budget else {}),
              **({"head_budget_cap": a.head_budget_cap} if a.head_budget_cap is not None else {}),
              **({"head_budget_cap_ratio": a.head_budget_cap_ratio} if a.head_budget_cap_ratio is not None else {}),
              **({"write_head": a.write_head} if a.write_head else {})},
        ratios=tuple(float(r) for r in a.ratios.split(",")), curriculum=False, stage="lora", lora_r=16, lora_alpha=32, lr_lora=1e-3, lr_gist=5e-3,
        warmup=20, batch_items=a.batch_items, cont_items=a.cont_items, w_qa=a.w_qa, w_distill=a.w_distill,
        w_cont=a.w_cont, w_recon=a.w_recon, w_mixed=a.w_mixed, answer_last=a.answer_last, recon_on=a.recon_on, eval_every=10**9, eval_items=0, save_every=25, snapshot_every=25, log_every=1,
        pool_items=3000, anchor_dropout=a.anchor_dropout, reader=a.reader,
    )
    Trainer(cfg).train(progress=False)


if __name__ == "__main__":
    main()
