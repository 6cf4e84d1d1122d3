"""
Memory evaluation: does the model remember, and what users see when it does. On held-out memory episodes the model
is told facts, the later turns are written into its STM one by one, and at the probe it answers from memory alone
(greedy, exact match of the one-word answer). Every row stands next to its control - the same model with its STM
reset just before the probe - and the chance level of guessing among the slot's values.

  recall      by distance (turns between the fact and the question), all episode kinds, and per kind:
              long-range (the probe returns to turn 1), cumulative (facts build up), overwrite (latest value wins)
  binding     the long-range episodes whose first turn gives the same slot to two people ("Ruby's favourite food is
              pizza. Lucy's favourite food is pie." ... "What is Lucy's favourite food?"), nothing changed later
  chat flow   the same episodes as `recall`, but every earlier turn is written with the model's *own* greedy
              answer, as chat.py writes it
  in-context  two people, one slot and the question in one message, fresh memory: the decoder's own ceiling
  paraphrase  the recall episodes reworded in phrasings training never uses: the questions only, and the facts and
              the questions (data/memory_world.py, PHRASINGS)
  span        k facts (k = 1, 2, 4, 8), one per turn or all in one turn, about one person or several, then a
              question about one of them: the number of facts the STM keeps is the largest k recalled >= 90%

    python evaluate.py --ckpt=out/nano/mrl/ckpt.pt [--distances=[1,2,4,8] --n_per_distance=200]
"""

import json
import math
import os

import torch

import cli
import engine
import training
from data.loaders import (collate_dialogues, collate_interactions, collate_queries, episode_tensors, episode_turns,
                          length_chunks, pad_rows, render_dialogue)
from data.memory_world import SLOTS, read_jsonl
from model import StatelessDecoder, token_accuracy, token_loss
from scores import normalize

DEFAULTS = dict(
    ckpt="out/nano/mrl/ckpt.pt",
    data_dir="data/cache/world",
    episodes_file="episodes_test.jsonl",
    incontext_file="incontext_test.jsonl",
    span_file="span_test.jsonl",
    binding_file="binding_test.jsonl",  # the binding row's episodes (else: those of episodes_file)
    paraphrase_questions_file="paraphrase_questions_test.jsonl",  # the questions reworded
    paraphrase_file="paraphrase_test.jsonl",  # the facts and the questions reworded
    n_span=100,  # episodes per (layout, k) of the span rows
    distances=[1, 2, 4, 8],
    n_per_distance=200,  # episodes per distance for `recall` and `chat flow` (binding: all of that distance)
    chat_flow=True,
    batch_size=50,
    max_answer=16,  # the probe's answer is one word
    max_turn_answer=48,  # chat flow: the longest answer the model may give to an earlier turn
    seed=1234,
    device="auto",
    out="",  # JSON path; default: next to the checkpoint
)

KINDS = ("long-range", "cumulative", "overwrite")


# -----------------------------------------------------------------------------
# The memory evaluation


def chance(ep):
    """Probability of guessing the gold word among the values the probed slot can take."""
    values = SLOTS[ep["slot"]]["values"]
    return 1.0 / (len(values) - (ep["slot"] == "friend"))  # nobody is their own best friend


# What a model remembers, for either kind: RxT's STM, or the whole history that the stateless baseline re-reads


def fresh_memory(model, batch_size, g):
    return [[] for _ in range(batch_size)] if isinstance(model, StatelessDecoder) else model.new_memory(batch_size, g)


def write(model, tok, memory, records):
    """The turns (records) join the memory: RxT writes them into its STM, the baseline adds them to its history."""
    if isinstance(model, StatelessDecoder):
        return [history + [r] for history, r in zip(memory, records)]
    ids, attn_mask, _ = collate_interactions(tok, records, model.cfg.seq_len)
    device = model.embed.weight.device
    ids, attn_mask = ids.to(device), attn_mask.to(device)
    # on a CPU the padding is not computed; a GPU keeps the padded batch (no host sync, the same shapes)
    return model.update_memory(memory, ids, attn_mask, length_chunks(attn_mask) if device.type == "cpu" else None)


@torch.no_grad()
def answer(model, tok, queries, memory, max_new_tokens):
    """Greedy answers (text) to a batch of queries, reading the memory."""
    device, seq_len = model.embed.weight.device, model.cfg.seq_len
    if isinstance(model, StatelessDecoder):  # the prompt is the whole conversation so far
        prompt_len = seq_len - max_new_tokens - 1
        ids, attn_mask = pad_rows([render_dialogue(tok, history, prompt_len, query=q)[0]
                                   for history, q in zip(memory, queries)], tok.pad_id)
        ans, lengths = engine.generate(model, ids.to(device), attn_mask.to(device), max_new_tokens=max_new_tokens,
                                       temperature=0, eos_id=tok.eos_id)
    else:
        ids, attn_mask = collate_queries(tok, queries, seq_len, max_new_tokens)
        ans, lengths = engine.generate(model, ids.to(device), attn_mask.to(device), memory,
                                       max_new_tokens=max_new_tokens, temperature=0, eos_id=tok.eos_id)
    return [tok.decode([t for t in ans[b, :lengths[b]].tolist() if t != tok.eos_id]) for b in range(len(queries))]


@torch.no_grad()
def play(model, tok, episodes, cfg, reset_before_probe=False, own_answers=False):
    """Per episode: 1 if the probe's greedy answer equals the gold word, else 0. Every turn before the probe joins
    the memory - with its reference answer, or (own_answers) with the model's own greedy answer."""
    g = torch.Generator(model.embed.weight.device).manual_seed(cfg["seed"])
    hits = []
    for i in range(0, len(episodes), cfg["batch_size"]):
        batch = episodes[i:i + cfg["batch_size"]]
        turns = [episode_turns(ep) for ep in batch]
        memory = fresh_memory(model, len(batch), g)
        # the control's writes would be thrown away at the reset: skip them (the generator draws the same noise)
        for t in range(0 if reset_before_probe else len(turns[0]) - 1):
            records = [tr[t] for tr in turns]
            if own_answers:
                said = answer(model, tok, [r["query"] for r in records], memory, cfg["max_turn_answer"])
                records = [{"query": r["query"], "answer": a} for r, a in zip(records, said)]
            memory = write(model, tok, memory, records)
        if reset_before_probe:
            memory = fresh_memory(model, len(batch), g)
        said = answer(model, tok, [tr[-1]["query"] for tr in turns], memory, cfg["max_answer"])
        hits += [float(normalize(a) == normalize(ep["gold"])) for a, ep in zip(said, batch)]
    return hits


@torch.no_grad()
def answer_tokens(model, tok, episodes, cfg):
    """Teacher-forced perplexity and accuracy on the answer tokens of every turn of the episodes: RxT reads the STM
    that holds the earlier turns, the baseline reads the earlier turns themselves."""
    device, seq_len = model.embed.weight.device, model.cfg.seq_len
    g = torch.Generator(device).manual_seed(cfg["seed"])
    loss_sum, correct, n = 0.0, 0.0, 0
    for d in cfg["distances"]:
        eps = [ep for ep in episodes if ep["distance"] == d][:cfg["n_per_distance"]]
        for i in range(0, len(eps), cfg["batch_size"]):
            batch = eps[i:i + cfg["batch_size"]]
            if isinstance(model, StatelessDecoder):
                steps = [[t.to(device) for t in collate_dialogues(tok, batch, seq_len)]]
            else:
                steps = episode_tensors(tok, batch, seq_len, device)
            stm = fresh_memory(model, len(batch), g)
            for ids, attn_mask, targets in steps:
                logits = model(ids)[0] if isinstance(model, StatelessDecoder) else model.decode(ids, stm)[0]
                counted = (targets != -100).sum().item()
                loss_sum += token_loss(logits, targets).item() * counted
                correct += token_accuracy(logits, targets).item() * counted
                n += counted
                if not isinstance(model, StatelessDecoder):
                    stm = model.update_memory(stm, ids, attn_mask)
    return {"ppl": math.exp(loss_sum / max(1, n)), "acc": correct / max(1, n), "tokens": n}


def score(model, tok, episodes, cfg, **kw):
    """{recall, reset_control, chance, n} of a set of episodes (the control only where memory could matter)."""
    if not episodes:
        return None
    hits = play(model, tok, episodes, cfg, **kw)
    result = {"n": len(episodes), "recall": sum(hits) / len(hits),
              "chance": sum(map(chance, episodes)) / len(episodes)}
    if episodes[0]["distance"] > 0 and not kw.get("own_answers"):
        control = play(model, tok, episodes, cfg, reset_before_probe=True)
        result["reset_control"] = sum(control) / len(control)
    result["by_kind"] = {k: sum(h for h, ep in zip(hits, episodes) if ep["kind"] == k) /
                         max(1, sum(ep["kind"] == k for ep in episodes)) for k in KINDS}
    return result


def kept(per_k, level=0.9):
    """The largest k such that every k' <= k is recalled at least at level (0: not even one fact)."""
    n = 0
    for k in sorted(per_k):
        if per_k[k]["recall"] < level:
            break
        n = k
    return n


def evaluate_memory(model, tok, episodes, incontext, cfg, span=(), paraphrases=None, binding=None):
    """{"recall": {d: ...}, "binding": {d: ...}, "chat_flow": {d: ...}, "in_context": {...}, "paraphrase": {name: {d: ...}},
    "span": {layout: {k: ...}}, "span_kept": {layout: k}, "answer_tokens": {...}}. paraphrases: {name: episodes};
    binding: the binding row's episodes (default: the binding ones among episodes)."""
    results = {"recall": {}, "binding": {}, "chat_flow": {}, "paraphrase": {}, "span": {}, "span_kept": {}}
    for name, eps in (paraphrases or {}).items():
        results["paraphrase"][name] = {d: score(model, tok, [ep for ep in eps if ep["distance"] == d]
                                                [:cfg["n_per_distance"]], cfg) for d in cfg["distances"]}
    for d in cfg["distances"]:
        eps = [ep for ep in episodes if ep["distance"] == d]
        results["recall"][d] = score(model, tok, eps[:cfg["n_per_distance"]], cfg)
        # binding alone: an overwrite episode's "Now ..." names the person once more, which makes it easier
        pool = eps if binding is None else [ep for ep in binding if ep["distance"] == d]
        results["binding"][d] = score(model, tok, [ep for ep in pool if ep.get("binding") and
                                                   ep["kind"] == "long-range"][:cfg["n_per_distance"]], cfg)
        if cfg["chat_flow"]:
            results["chat_flow"][d] = score(model, tok, eps[:cfg["n_per_distance"]], cfg, own_answers=True)
    results["in_context"] = score(model, tok, incontext, cfg)
    for layout in dict.fromkeys(ep["layout"] for ep in span):
        ks = sorted({ep["k"] for ep in span if ep["layout"] == layout})
        results["span"][layout] = {k: score(model, tok, [ep for ep in span if ep["layout"] == layout and ep["k"] == k]
                                            [:cfg["n_span"]], cfg) for k in ks}
        results["span_kept"][layout] = kept(results["span"][layout])
    results["answer_tokens"] = answer_tokens(model, tok, episodes, cfg)
    return results


def format_table(results):
    """One line per row, one column per distance: recall (reset control) [chance]."""
    distances = list(results["recall"])
    cell = lambda r, key="recall": "-" if r is None else f"{r[key]:.1%}"
    lines = ["row                     | " + " | ".join(f"d={d:<14}" for d in distances),
             "------------------------|-" + "-|-".join("-" * 16 for _ in distances)]

    def add(name, per_d):
        lines.append(f"{name:<24}| " + " | ".join(f"{v:<16}" for v in per_d))

    add("recall", [cell(results["recall"][d]) for d in distances])
    add("  reset control", [cell(results["recall"][d], "reset_control") for d in distances])
    add("  chance", [cell(results["recall"][d], "chance") for d in distances])
    for k in KINDS:
        add(f"  {k}", ["-" if results["recall"][d] is None else f"{results['recall'][d]['by_kind'][k]:.1%}"
                       for d in distances])
    b = results["binding"]
    add("binding", [cell(b[d]) for d in distances])
    add("  reset control", [cell(b[d], "reset_control") for d in distances])
    if results["chat_flow"]:
        add("chat flow (own answers)", [cell(results["chat_flow"].get(d)) for d in distances])
    for name, per_d in results.get("paraphrase", {}).items():
        label = {"questions": "paraphrased questions", "facts+questions": "paraphrased facts+qs"}.get(name, name)
        add(label, [cell(per_d.get(d)) for d in distances])
    ic = results["in_context"]
    if ic:
        lines.append(f"in-context (one message, fresh memory): {ic['recall']:.1%} of {ic['n']} "
                     f"(chance {ic['chance']:.1%})")
    for layout, per_k in results.get("span", {}).items():
        lines.append(f"span, {layout + ':':<26}" + "  ".join(
            f"k={k} {r['recall']:.1%} ({r['reset_control']:.1%})" for k, r in per_k.items()) +
            f"  -> keeps {results['span_kept'][layout]}")
    a = results.get("answer_tokens")
    if a:
        lines.append(f"answer tokens of every turn, teacher-forced: perplexity {a['ppl']:.3f}, accuracy {a['acc']:.1%} "
                     f"({a['tokens']} tokens)")
    return "\n".join(lines)


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    cli.check(cfg, distances=cli.DISTANCES, seed=cli.at_least(0), **{k: cli.at_least(1) for k in (
        "n_per_distance", "n_span", "batch_size", "max_answer", "max_turn_answer")})
    cli.check_device(cfg["device"])
    cli.require_files(cfg["data_dir"], [cfg["episodes_file"]])
    model, tok, ckpt = training.load_for_inference(cfg["ckpt"], training.resolve_device(cfg["device"]))
    episodes = read_jsonl(os.path.join(cfg["data_dir"], cfg["episodes_file"]))
    have = sorted({ep["distance"] for ep in episodes})
    if set(cfg["distances"]) - set(have):
        raise cli.ConfigError(f"distances={cfg['distances']}: {cfg['episodes_file']} has episodes at {have}")
    if cfg["max_turn_answer"] + 8 > model.cfg.seq_len or cfg["max_answer"] + 8 > model.cfg.seq_len:
        raise cli.ConfigError(f"max_answer and max_turn_answer leave no room for a query in the model's "
                              f"{model.cfg.seq_len}-token interactions")
    ic_path = os.path.join(cfg["data_dir"], cfg["incontext_file"])
    incontext = read_jsonl(ic_path) if os.path.isfile(ic_path) else []
    span_path = os.path.join(cfg["data_dir"], cfg["span_file"])  # worlds built before the span rows have none
    span = read_jsonl(span_path) if os.path.isfile(span_path) else []
    # the recall episodes reworded (worlds built before the paraphrase rows have none)
    files = {"questions": cfg["paraphrase_questions_file"], "facts+questions": cfg["paraphrase_file"]}
    paraphrases = {name: read_jsonl(os.path.join(cfg["data_dir"], f)) for name, f in files.items()
                   if os.path.isfile(os.path.join(cfg["data_dir"], f))}
    binding_path = os.path.join(cfg["data_dir"], cfg["binding_file"])
    binding = read_jsonl(binding_path) if os.path.isfile(binding_path) else None
    results = evaluate_memory(model, tok, episodes, incontext, cfg, span, paraphrases, binding)
    print(f"memory of {cfg['ckpt']} (stage {ckpt['stage']}, step {ckpt['step']}) on {cfg['episodes_file']}, greedy, "
          f"exact match:")
    print(format_table(results))
    out = cfg["out"] or os.path.join(os.path.dirname(cfg["ckpt"]), "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"ckpt": cfg["ckpt"], "stage": ckpt["stage"], "results": results}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    cli.run(main)
