# Stage 0 on the offline memory world, nano model, CPU: python train_mlm.py config/nano_mlm.py
preset = "nano"
# the memory levers that measured best at nano (README, "Making memory bind"); the reference design is model_args = {}
model_args = {"memory_rope": False, "memory_qk_norm": True, "memory_heads": 4, "gate_type": "per-element",
              "stm_init": "learned"}
data_dir = "data/cache/world"
out_dir = "out/nano/mlm"
seq_len = 128
batch_size = 32
max_iters = 300
lr = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 100
