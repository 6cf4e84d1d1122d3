# Stage 2 (interaction SFT) on the memory world's {query, answer} turns: python train_joint.py config/nano_sft.py
data_dir = "data/cache/world"
init_from = "out/nano/joint/ckpt.pt"
out_dir = "out/nano/sft"
sft = True
seq_len = 128
batch_size = 32
max_iters = 400
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 200
ed_swap = 0.5  # half the rows read another row's ED: the decoder must also answer from its own query
