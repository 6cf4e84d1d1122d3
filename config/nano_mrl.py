# Stages 3-5 on the memory world's episodes, nano model, CPU: python train_mrl.py config/nano_mrl.py
data_dir = "data/cache/world"
init_from = "out/nano/sft/ckpt.pt"
out_dir = "out/nano"
# The memory-attention pre-training phase ("mem") is skipped here: on nano its cosine objective is best met by one
# constant STM (measured: slot-slot cosine 0.997, the same slot across episodes 0.994), and SMAT started from it
# learned recall more slowly than SMAT started straight from SFT. Run it with --phases=mem,smat,mrl.
phases = "smat,mrl"
batch_size = 64
smat_iters = 800
smat_lr = 1e-3
smat_curriculum = [[1], [1, 2], [1, 2, 4]]
smat_unfreeze_memory_at = 0.0
smat_unfreeze_encoder_at = 0.1
smat_detach_stm = False  # SMAT back-propagates through the whole episode: the write of turn 1 learns to survive turns 2..d
mrl_iters = 40
mrl_lr = 2e-5
mrl_curriculum = [[2], [4]]
mrl_max_answer = 12
eval_interval = 400
eval_iters = 4
# DMPO instead of MRL (python demo.py --dmpo, or --phases=smat,dmpo): measured from one SMAT checkpoint it did not beat
# MRL (README, "DMPO or MRL"), so MRL stays the demo's last phase
dmpo_iters = 100  # the wall time of mrl_iters = 40 on the demo's CPU (README, "DMPO or MRL")
dmpo_lr = 5e-5
dmpo_curriculum = [[1, 2, 4]]
