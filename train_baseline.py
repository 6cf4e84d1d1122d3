"""
The stateless baseline - the RxT paper's comparison: the same decoder without memory cross-attention, a plain
decoder-only LLM, trained on the same world with the same tokenizer. It has no memory, so every turn it re-reads
the whole conversation, `[BOS][Q] q1 [A] a1 [EOS] [BOS][Q] q2 [A] a2 [EOS] ...`, and answers the last query.

Two stages, like RxT's without the memory: dialogue=False is next-token pre-training on the stories; dialogue=True
trains on whole memory episodes as one sequence each, with the loss on the answer tokens of every turn.
evaluate.py evaluates it on the same held-out episodes as RxT (the history in its context instead of a memory).

    python train_baseline.py config/nano_baseline_lm.py [--key=value ...]    # pre-training
    python train_baseline.py config/nano_baseline.py [--key=value ...]       # dialogues
"""

import os

import torch

import cli
import training
from data.loaders import collate_dialogues, get_lm_batch, next_token_targets
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer
from model import StatelessDecoder, token_accuracy

DEFAULTS = dict(training.TRAIN_DEFAULTS, data_dir="data/cache/world", out_dir="out/nano/baseline", seq_len=512,
                aux_weight=0.01, dialogue=False, episodes_file="episodes_train.jsonl",
                distances=[1, 2, 4, 8])  # dialogue: the episode lengths it trains on (turns from fact to question)


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    device, ctx, rank, world = training.setup(cfg, dict(distances=cli.DISTANCES, aux_weight=cli.at_least(0)))
    files = [cfg["episodes_file"]] if cfg["dialogue"] else ["train.bin", "val.bin"]
    cli.require_files(cfg["data_dir"], ["tokenizer.tiktoken"] + files)
    tok = Tokenizer.from_file(os.path.join(cfg["data_dir"], "tokenizer.tiktoken"))
    if cfg["dialogue"]:
        episodes = read_jsonl(os.path.join(cfg["data_dir"], cfg["episodes_file"]))
        have = sorted({ep["distance"] for ep in episodes})
        if set(cfg["distances"]) - set(have):
            raise cli.ConfigError(f"distances={cfg['distances']}: {cfg['episodes_file']} has episodes at {have}")
        episodes = [ep for ep in episodes if ep["distance"] in cfg["distances"]]
    model = training.init_model(cfg, tok, device, kind=StatelessDecoder)

    if cfg["dialogue"]:
        n_val = max(1, len(episodes) // 50)
        splits = {"val": episodes[:n_val], "train": episodes[n_val:]}

        def get_batch(split, step, g):
            pool = splits[split]
            picks = torch.randint(len(pool), (cfg["batch_size"],), generator=g).tolist()
            ids, _, targets = collate_dialogues(tok, [pool[i] for i in picks], cfg["seq_len"])
            return ids.to(device), targets.to(device)
    else:
        def get_batch(split, step, g):
            ids = get_lm_batch(os.path.join(cfg["data_dir"], f"{split}.bin"), cfg["batch_size"], cfg["seq_len"],
                               device, generator=g)
            return ids, next_token_targets(ids, ids != tok.pad_id)

    def loss_fn(model, batch, step, g):  # right padding needs no mask: causal attention never looks ahead
        ids, targets = batch
        logits, loss, aux_loss = model(ids, targets)
        return loss + cfg["aux_weight"] * aux_loss, {"ar_loss": loss.detach(), "ar_acc": token_accuracy(logits, targets),
                                                     "tokens": ids.numel()}

    return training.train(cfg, model, stage="baseline" if cfg["dialogue"] else "baseline-lm", get_batch=get_batch,
                          loss_fn=loss_fn, params=model.parameters(), device=device, ctx=ctx, rank=rank, world=world,
                          tokenizer=tok)


if __name__ == "__main__":
    cli.run(main)
