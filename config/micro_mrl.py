# RxT-Alpha Micro, stages 3-5 on memory episodes (see config/micro_sft.py for the data).
data_dir = "data/cache/tinystories"
init_from = "out/micro/sft/ckpt.pt"
out_dir = "out/micro"
phases = "mem,smat,mrl"
seq_len = 256
batch_size = 64
mem_iters = 500
smat_iters = 3000
mrl_iters = 1000
eval_interval = 500
chunks = False  # the GPU recipe keeps padded batches: fixed shapes for compile, no host sync per batch
