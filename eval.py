"""
Memory evaluation: does the model remember? On held-out memory episodes, the model is told a fact, then the
distractor turns are written into its STM one by one, and at the probe it answers from memory alone (greedy).
Recall = exact match of the answer with the gold word, by distance (turns between fact and probe), next to a
control where the STM is reset just before the probe (what the model guesses without memory: chance level).

    python eval.py --ckpt=out/nano/mrl/ckpt.pt [--distances=[1,2,4,8] --n_per_distance=200]
"""

import json
import os
import re

import torch

import training
from data.loaders import collate_interactions, collate_queries, episode_turns
from data.memory_world import read_jsonl

DEFAULTS = dict(
    ckpt="out/nano/mrl/ckpt.pt",
    data_dir="data/cache/world",
    episodes_file="episodes_test.jsonl",
    distances=[1, 2, 4, 8],
    n_per_distance=200,
    batch_size=50,
    max_answer=16,
    seq_len=128,
    seed=1234,
    device="auto",
    out="",  # JSON path; default: next to the checkpoint
)


def normalize(text):
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


@torch.no_grad()
def recall(model, tok, episodes, cfg, reset_before_probe=False):
    """Fraction of episodes whose probe answer (greedy) equals the gold word."""
    device = model.embed.weight.device
    g = torch.Generator(device).manual_seed(cfg["seed"])
    hits, answers = 0, []
    for i in range(0, len(episodes), cfg["batch_size"]):
        batch = episodes[i:i + cfg["batch_size"]]
        turns = [episode_turns(ep) for ep in batch]
        stm = model.new_memory(len(batch), generator=g)
        for t in range(len(turns[0]) - 1):  # everything before the probe is written into memory
            ids, mask, _ = collate_interactions(tok, [tr[t] for tr in turns], cfg["seq_len"])
            stm = model.update_memory(stm, ids.to(device), mask.to(device))
        if reset_before_probe:
            stm = model.new_memory(len(batch), generator=g)
        q_ids, q_mask = collate_queries(tok, [tr[-1]["query"] for tr in turns], cfg["seq_len"])
        ans, lengths = model.generate(q_ids.to(device), q_mask.to(device), stm, max_new_tokens=cfg["max_answer"],
                                      temperature=0, eos_id=tok.eos_id)
        for b, ep in enumerate(batch):
            text = tok.decode([t for t in ans[b, :lengths[b]].tolist() if t != tok.eos_id])
            hits += normalize(text) == normalize(ep["gold"])
            answers.append(text)
    return hits / max(1, len(episodes)), answers


def evaluate_memory(model, tok, episodes, cfg):
    """{distance: {"n", "recall", "reset_control"}} over the first n_per_distance episodes of each distance."""
    results = {}
    for d in cfg["distances"]:
        eps = [ep for ep in episodes if ep["distance"] == d][:cfg["n_per_distance"]]
        if not eps:
            continue
        acc, _ = recall(model, tok, eps, cfg)
        control, _ = recall(model, tok, eps, cfg, reset_before_probe=True)
        results[d] = {"n": len(eps), "recall": acc, "reset_control": control}
    return results


def format_table(results):
    lines = ["distance | episodes | recall | STM reset before probe (control)",
             "-------- | -------- | ------ | --------------------------------"]
    for d, r in results.items():
        lines.append(f"{d:>8} | {r['n']:>8} | {r['recall']:>6.1%} | {r['reset_control']:>6.1%}")
    return "\n".join(lines)


def main(argv):
    cfg = training.configure(DEFAULTS, argv)
    device = torch.device(training.resolve_device(cfg["device"]))
    ckpt = training.load_checkpoint(cfg["ckpt"], device)
    model = training.model_from_checkpoint(ckpt, cfg["ckpt"], device).eval()
    tok = training.tokenizer_from_checkpoint(ckpt)
    episodes = read_jsonl(os.path.join(cfg["data_dir"], cfg["episodes_file"]))
    results = evaluate_memory(model, tok, episodes, cfg)
    print(f"memory recall of {cfg['ckpt']} (stage {ckpt['stage']}, step {ckpt['step']}) on {cfg['episodes_file']}:")
    print(format_table(results))
    out = cfg["out"] or os.path.join(os.path.dirname(cfg["ckpt"]), "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"ckpt": cfg["ckpt"], "stage": ckpt["stage"], "results": results}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    training.cli(main)
