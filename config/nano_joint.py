# Stage 1 (joint LM pre-training) on the offline memory world's stories: python train_joint.py config/nano_joint.py
data_dir = "data/cache/world"
init_from = "out/nano/mlm/ckpt.pt"
out_dir = "out/nano/joint"
seq_len = 128
batch_size = 32
max_iters = 600
lr = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 200
noise_std = 0.15
ed_swap = 0.5  # half the rows read another row's ED: the decoder must also answer from its own query
