# RxT-Alpha Mini sizes (for completeness; the Mini encoder card's memory cross-attention is in the preset).
# Needs a 10k tokenizer: python -m data.tinystories --out_dir data/cache/tinystories10k --vocab_size 10000
preset = "mini"
data_dir = "data/cache/tinystories10k"
out_dir = "out/mini/joint"
seq_len = 1024
batch_size = 64
max_iters = 20000
lr = 5e-4
min_lr = 5e-5
warmup_iters = 500
eval_interval = 1000
compile = True
