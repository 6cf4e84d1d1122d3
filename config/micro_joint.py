# RxT-Alpha Micro, stage 1: joint LM pre-training on TinyStories, the seeds' recipe (batch 256, seq 256, lr 1e-3
# cosine to 2e-4, bf16 on GPU). ~65k tokens per step: 8k steps is about one epoch of TinyStories-V2.
data_dir = "data/cache/tinystories"
init_from = "out/micro/mlm/ckpt.pt"
out_dir = "out/micro/joint"
seq_len = 256
batch_size = 256
max_iters = 8000
lr = 1e-3
min_lr = 2e-4
warmup_iters = 200
eval_interval = 500
eval_iters = 20
noise_std = 0.15
compile = True
