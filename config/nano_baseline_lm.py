# The stateless baseline, stage 1: next-token pre-training on the world's stories. About the RxT nano's total size
# (8 layers instead of 4, no memory cross-attention), with a 512-token context for whole conversations.
# python train_baseline.py config/nano_baseline_lm.py   (larger: --model_args="{'d_model': 128, 'expert_dim': 256, ...}")
preset = "nano"
model_args = {"n_layers": 8, "seq_len": 512}
data_dir = "data/cache/world"
out_dir = "out/nano/baseline_lm"
seq_len = 128
batch_size = 32
max_iters = 600
lr = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 200
