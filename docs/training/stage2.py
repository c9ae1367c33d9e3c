import torch
torch.set_num_threads(2)
from gist_memory.train.trainer import TrainConfig, Trainer
cfg = TrainConfig(out_dir="runs/smollm2-s2", gist={"target_ratio": 4.0, "anchors": "capitalized", "max_sentence_tokens": 48, "num_gist_tokens": 24}, init_from="runs/smollm2-main/checkpoint", steps=45, warmup=5,
                  batch_items=2, grad_accum=2, eval_every=10**9, save_every=5, snapshot_every=10,
                  w_qa=1.0, w_recon=0.5, ratios=(4.0, 8.0), curriculum=False)
Trainer(cfg).train(progress=False)
