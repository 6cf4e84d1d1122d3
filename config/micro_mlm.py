# RxT-Alpha Micro, stage 0 on TinyStories (one GPU). Data: python -m data.tinystories --out_dir data/cache/tinystories
preset = "micro"
data_dir = "data/cache/tinystories"
out_dir = "out/micro/mlm"
seq_len = 256
batch_size = 256
max_iters = 3000
lr = 1e-3
min_lr = 2e-4
warmup_iters = 200
eval_interval = 500
eval_iters = 20
compile = True
