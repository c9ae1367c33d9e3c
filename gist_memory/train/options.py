"""The `TrainConfig` fields `gist-memory train` takes as options, shared by the CLI and the model card.

The command (`gist_memory.cli.train`) declares one option per field here, named after it (`batch_items` ->
`--batch-items`); `gist_memory.train.ship` writes each training stage back as that command line. The other
`TrainConfig` fields are set apart: `ratios` and `kinds` (comma-separated), `bf16` (`--dtype`), `gist` (the
GistConfig options), `out_dir` (the argument). Pure Python: the CLI imports this without torch.
"""

from __future__ import annotations

#: TrainConfig fields with an option of the same name (`curriculum` is a flag: `--curriculum/--no-curriculum`).
TRAIN_OPTION_FIELDS: tuple[str, ...] = (
    "base", "corpus", "steps", "batch_items", "grad_accum", "lr_lora", "lr_gist", "warmup", "stage", "lora_r",
    "lora_alpha", "w_qa", "w_recon", "w_distill", "w_cont", "w_mixed", "answer_last", "cont_items", "cont_tokens", "recon_tokens",
    "recon_on",
    "anchor_dropout", "reader",
    "pool_items", "eval_items", "eval_every", "save_every", "snapshot_every", "log_every", "seed", "device",
    "curriculum", "init_from", "stop_at",
)  # fmt: skip

#: Boolean fields, written as a flag pair rather than `--name VALUE`.
FLAG_FIELDS: frozenset[str] = frozenset({"curriculum", "answer_last"})


def option_name(field: str) -> str:
    """The command-line option of a TrainConfig field: `batch_items` -> `--batch-items`."""
    return "--" + field.replace("_", "-")
