"""
Stages 1 and 2 - joint LM pre-training and interaction SFT.

The encoder reads a masked copy of the text (MLM loss, as in stage 0); the decoder reads the clean text and,
through its memory cross-attention, the encoder's *detached* ED plus Gaussian noise ("fake STM noise") as if it
were the memory. This aligns the decoder's memory reading with the encoder's vector space before there is any real
memory. L = L_AR + L_MLM + aux_weight * L_aux (the MoE balancing loss).
With sft=True the same runs on {query, answer} interactions `[BOS][Q] query [A] answer [EOS]`, with the decoder's
loss on the answer tokens only.

    python train_joint.py config/nano_joint.py [--key=value ...]      # stage 1
    python train_joint.py config/nano_sft.py [--key=value ...]        # stage 2
"""

import math
import os

import torch

import cli
import training
from data.loaders import IGNORE, collate_interactions, get_lm_batch, length_chunks, mlm_inputs, next_token_targets
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer
from model import token_accuracy

DEFAULTS = dict(training.TRAIN_DEFAULTS, data_dir="data/cache/world", seq_len=128, mask_prob=0.15, noise_std=0.15,
                aux_weight=0.01, sft=False, sft_file="interactions.jsonl", out_dir="out/nano/joint",
                ed_swap=0.0,  # share of rows whose decoder reads another row's ED (see loss_fn)
                copy_rows=0.0,  # share of pre-training rows that are copy rows (see copy_rows), never in SFT
                chunks=True)  # run rows in groups of similar length (data.loaders.length_chunks): padding not computed


def copy_rows(n, seq_len, tok, g):
    """Rows `[BOS] s f s [EOS]`: s is 16 random tokens (fewer if seq_len is short), f a random gap of 0..span-1 random tokens, and the targets
    are the second copy from its second token on. Predicting them needs an induction head - find where the current
    token was before and copy what followed it - which is how a decoder reads a fact back out of its own message (the
    gap keeps position from standing in for content). Stories alone do not teach it at the nano budget.
    -> ids, attn_mask, targets, each (n, seq_len)."""
    span = min(16, (seq_len - 1) // 3)  # the longest row, 1 + span + (span - 1) + span + 1 tokens, fits
    ids = torch.full((n, seq_len), tok.pad_id, dtype=torch.long)
    targets = torch.full_like(ids, IGNORE)
    for i in range(n):
        s = torch.randint(len(tok.ranks), (span,), generator=g)
        gap = torch.randint(len(tok.ranks), (int(torch.randint(span, (1,), generator=g)),), generator=g)
        row = torch.cat([torch.tensor([tok.bos_id]), s, gap, s, torch.tensor([tok.eos_id])])
        ids[i, :len(row)] = row
        start = 1 + span + len(gap)  # the second copy's first token: nothing before it says what it is
        targets[i, start:start + span - 1] = row[start + 1:start + span]
    return ids, ids != tok.pad_id, targets


def swap_memory(ed, attn_mask, share, g, always=0):
    """The ED of its own text holds every next token, so a decoder that always reads it learns to copy and never to
    answer from its own query. A share of the rows read the previous row's ED instead (with its mask) - memory that
    does not help, as in real use, where the STM holds earlier turns and never the current one.
    The first `always` rows (copy rows) always read another row's: their own ED would hand them the copy.
    ed (L, B, T, D), attn_mask (B, T) -> the same shapes."""
    swap = torch.rand(ed.size(1), generator=g, device=ed.device) < share  # (B,)
    swap[:always] = True
    other = torch.roll(torch.arange(ed.size(1), device=ed.device), 1)
    return (torch.where(swap[None, :, None, None], ed[:, other], ed),
            torch.where(swap[:, None], attn_mask[other], attn_mask))


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    device, ctx, rank, world = training.setup(cfg, dict(mask_prob=cli.between(0.01, 0.9), ed_swap=cli.between(
        0, 1), copy_rows=cli.between(0, 1), noise_std=cli.at_least(0), aux_weight=cli.at_least(0)))
    files = [cfg["sft_file"]] if cfg["sft"] else ["train.bin", "val.bin"]
    cli.require_files(cfg["data_dir"], ["tokenizer.tiktoken"] + files, cli.WORLD_HINT)
    tok = Tokenizer.from_file(os.path.join(cfg["data_dir"], "tokenizer.tiktoken"))
    model = training.init_model(cfg, tok, device)
    n_copy = 0 if cfg["sft"] else int(cfg["batch_size"] * cfg["copy_rows"] + 0.5)  # rows of each pre-training batch

    if cfg["sft"]:
        records = read_jsonl(os.path.join(cfg["data_dir"], cfg["sft_file"]))
        n_val = max(1, len(records) // 50)
        splits = {"val": records[:n_val], "train": records[n_val:]}

        def get_batch(split, step, g):  # interactions; the targets are the answer tokens
            pool = splits[split]
            picks = torch.randint(len(pool), (cfg["batch_size"],), generator=g).tolist()
            return [t.to(device) for t in collate_interactions(tok, [pool[i] for i in picks], cfg["seq_len"])]
    else:
        def get_batch(split, step, g):  # windows of stories; the targets are every next token
            ids = get_lm_batch(os.path.join(cfg["data_dir"], f"{split}.bin"), cfg["batch_size"], cfg["seq_len"],
                               device, generator=g)
            attn_mask = ids != tok.pad_id
            targets = next_token_targets(ids, attn_mask)
            if n_copy:  # the first rows become copy rows
                copy = [t.to(device) for t in copy_rows(n_copy, cfg["seq_len"], tok, g)]
                ids, attn_mask, targets = (torch.cat([c, t[n_copy:]]) for c, t in zip(copy, (ids, attn_mask, targets)))
            return ids, attn_mask, targets

    def loss_fn(model, batch, step, g):
        ids, attn_mask, targets = batch
        chunks = length_chunks(attn_mask) if cfg["chunks"] else None  # stories' windows are full: no chunks
        masked, mlm_targets = mlm_inputs(ids, attn_mask, tok.mask_id, cfg["mask_prob"], g)
        ed, mlm_loss, mlm_acc = model.mlm(masked, attn_mask, mlm_targets, chunks)
        memory, memory_mask = ed.detach(), attn_mask  # the decoder learns to read the encoder's space, not shape it
        if cfg["ed_swap"] > 0 or n_copy:
            memory, memory_mask = swap_memory(memory, memory_mask, cfg["ed_swap"], g, n_copy)
        if cfg["noise_std"] > 0:
            memory = memory + cfg["noise_std"] * torch.randn(memory.shape, generator=g, device=memory.device,
                                                             dtype=memory.dtype)
        logits, ar_loss, aux_loss = model.decode(ids, memory, memory_mask, targets, attn_mask, chunks)  # ED pads masked
        loss = ar_loss + mlm_loss + cfg["aux_weight"] * aux_loss
        return loss, {"mlm_loss": mlm_loss.detach(), "mlm_acc": mlm_acc, "ar_loss": ar_loss.detach(),
                      "ar_acc": token_accuracy(logits, targets), "aux_loss": aux_loss.detach(), "tokens": ids.numel()}

    # the memory attention network is not used until stage 3
    params = [p for n, p in model.named_parameters() if not n.startswith("memory_attention.")]
    metrics = training.train(cfg, model, stage="sft" if cfg["sft"] else "joint", get_batch=get_batch, loss_fn=loss_fn,
                             params=params, device=device, ctx=ctx, rank=rank, world=world, tokenizer=tok)
    return dict(metrics, ppl=math.exp(min(metrics.get("ar_loss", 50.0), 50.0)))


if __name__ == "__main__":
    cli.run(main)
