import torch
torch.set_num_threads(2)
from gist_memory.train.trainer import TrainConfig, Trainer
cfg = TrainConfig(out_dir="runs/smollm2-main", steps=400, batch_items=2, grad_accum=2, eval_items=40, eval_every=10**9,
                  save_every=10, snapshot_every=50, w_qa=1.0, w_recon=0.5, ratios=(2.0, 4.0, 8.0))
Trainer(cfg).train(progress=False)
