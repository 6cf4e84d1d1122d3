"""
Stages 1 and 2 - joint LM pre-training and interaction SFT (DESIGN.md section 4).

The encoder reads a masked copy of the text (MLM loss, as in stage 0); the decoder reads the clean text and,
through its memory cross-attention, the encoder's *detached* ED plus Gaussian noise ("fake STM noise") as if it
were the memory. This aligns the decoder's memory reading with the encoder's vector space before there is any real
memory. L = L_AR + L_MLM + 0.01 * L_aux (MoE balancing).
With sft=True the same runs on {query, answer} interactions `[BOS][Q] query [A] answer [EOS]`, with the decoder's
loss on the answer tokens only.

    python train_joint.py config/nano_joint.py [--key=value ...]      # stage 1
    python train_joint.py config/nano_sft.py [--key=value ...]        # stage 2
"""

import os

import torch
import torch.nn.functional as F

import training
from data.loaders import collate_interactions, get_lm_batch
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer
from train_mlm import mlm_loss

DEFAULTS = dict(training.TRAIN_DEFAULTS, data_dir="data/cache/world", seq_len=128, mask_prob=0.15, noise_std=0.15,
                aux_weight=0.01, sft=False, sft_file="interactions.jsonl", out_dir="out/nano/joint")


def ar_loss(logits, ids, loss_mask):
    """Next-token cross-entropy where loss_mask[:, t] says that predicting ids[:, t+1] counts (pads never do)."""
    targets = ids[:, 1:].masked_fill(~loss_mask[:, :-1], -100)  # ignored, without gathering a copy of the logits
    logits = logits[:, :-1].flatten(0, 1)
    targets = targets.flatten()
    loss = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    counted = targets != -100
    acc = (logits.argmax(dim=-1) == targets)[counted].float().mean()
    return loss, acc


def joint_loss(model, ids, mask, *, mask_id, mask_prob=0.15, noise_std=0.15, aux_weight=0.01, generator=None,
               loss_mask=None):
    """ids, mask (B, T); loss_mask (B, T) as in ar_loss, default: every real next token."""
    l_mlm, ed, metrics = mlm_loss(model, ids, mask, mask_id, mask_prob, generator)
    memory = ed.detach()  # the decoder learns to read the encoder's space, it does not get to shape it
    if noise_std > 0:
        memory = memory + noise_std * torch.randn(memory.shape, generator=generator, device=memory.device,
                                                  dtype=memory.dtype)
    logits, aux = model.decode(ids, memory, mask)  # the encoder's padding is masked out of the memory
    if loss_mask is None:
        loss_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    l_ar, acc = ar_loss(logits, ids, loss_mask)
    loss = l_ar + l_mlm + aux_weight * aux
    return loss, dict(metrics, ar_loss=l_ar.detach(), ar_acc=acc, aux_loss=aux.detach(), tokens=ids.numel())


def main(argv):
    cfg = training.configure(DEFAULTS, argv)
    device, ctx, rank, world = training.setup(cfg)
    tok = Tokenizer.from_file(os.path.join(cfg["data_dir"], "tokenizer.tiktoken"))
    model = training.init_model(cfg, tok, device)

    if cfg["sft"]:
        records = read_jsonl(os.path.join(cfg["data_dir"], cfg["sft_file"]))
        n_val = max(1, len(records) // 50)
        splits = {"val": records[:n_val], "train": records[n_val:]}

        def get_batch(split, g):
            pool = splits[split]
            picks = torch.randint(len(pool), (cfg["batch_size"],), generator=g).tolist()
            ids, mask, loss_mask = collate_interactions(tok, [pool[i] for i in picks], cfg["seq_len"])
            return ids.to(device), mask.to(device), loss_mask.to(device)
    else:
        def get_batch(split, g):
            x, _ = get_lm_batch(os.path.join(cfg["data_dir"], f"{split}.bin"), cfg["batch_size"], cfg["seq_len"],
                                device, generator=g)
            return x, x != tok.pad_id, None

    def loss_fn(model, batch, g):
        ids, mask, loss_mask = batch
        return joint_loss(model, ids, mask, mask_id=tok.mask_id, mask_prob=cfg["mask_prob"],
                          noise_std=cfg["noise_std"], aux_weight=cfg["aux_weight"], generator=g, loss_mask=loss_mask)

    # the memory attention network is not used until stage 3
    params = [p for n, p in model.named_parameters() if not n.startswith("memory_attention.")]
    return training.train(cfg, model, stage="sft" if cfg["sft"] else "joint", loss_fn=loss_fn, get_batch=get_batch,
                          device=device, ctx=ctx, rank=rank, world=world, tokenizer=tok, params=params)


if __name__ == "__main__":
    training.cli(main)
