# RxT-Alpha Micro, stage 2: interaction SFT. TinyStories has no interactions, so we use the memory world's
# {query, answer} turns (plain text, tokenized at load time with the TinyStories tokenizer):
#   python -m data.memory_world --out_dir data/cache/world && cp data/cache/world/*.jsonl data/cache/tinystories/
data_dir = "data/cache/tinystories"
init_from = "out/micro/joint/ckpt.pt"
out_dir = "out/micro/sft"
sft = True
seq_len = 256
batch_size = 128
max_iters = 2000
lr = 5e-4
min_lr = 5e-5
warmup_iters = 100
eval_interval = 500
compile = True
chunks = False  # the GPU recipe keeps padded batches: fixed shapes for compile, no host sync per batch
