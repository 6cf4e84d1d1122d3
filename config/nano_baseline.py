# The stateless baseline, stage 2: whole memory episodes as one sequence each (distances 1, 2, 4, 8), the loss on
# every turn's answer: what RxT learns in SFT + SMAT, without a memory. python train_baseline.py config/nano_baseline.py
data_dir = "data/cache/world"
init_from = "out/nano/baseline_lm/ckpt.pt"
out_dir = "out/nano/baseline"
dialogue = True
distances = [1, 2, 4, 8]
seq_len = 512
batch_size = 16
max_iters = 2460  # with the LM stage, about the RxT curriculum's wall time on the demo's CPU (README)
lr = 1e-3
min_lr = 1e-4
warmup_iters = 30
eval_interval = 400
eval_iters = 4
