"""
Batches for training: random windows of a uint16 .bin (pre-training), padded interactions with an answer-only loss
mask (SFT), padded queries (generation), and batches of memory episodes.
"""

import random

import numpy as np
import torch


def get_lm_batch(bin_path, batch_size, seq_len, device="cpu", generator=None):
    """
    Random windows of a uint16 token file: x (B, T) and y = x shifted by one (B, T), int64 on device.
    The memmap is re-opened on every call: one long-lived memmap keeps growing in RAM (nanoGPT's fix).
    """
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    if len(data) <= seq_len:
        raise ValueError(f"{bin_path} holds {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + seq_len] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + seq_len] for i in ix]).astype(np.int64))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def fit_interaction(tokenizer, query, answer, max_len):
    """
    [BOS][Q] query [A] answer [EOS], cut to at most max_len tokens. Returns (ids, index of [A]).
    Too long: drop query tokens from the front (the question usually ends the query) until it fits. If even
    [BOS][Q][A] answer [EOS] does not fit, cut the end of the answer and drop [EOS]: a cut answer must not teach
    the model to stop mid-sentence.
    """
    q, a = tokenizer.encode(query), tokenizer.encode(answer) + [tokenizer.eos_id]
    q = q[max(0, len(q) + len(a) + 3 - max_len):]
    ids = [tokenizer.bos_id, tokenizer.q_id] + q + [tokenizer.a_id] + a
    return ids[:max_len], len(q) + 2


def collate_interactions(tokenizer, records, max_len):
    """
    Right-padded batch of {query, answer} records as [BOS][Q] query [A] answer [EOS] (see fit_interaction for
    truncation). Returns ids (B, T) int64, attn_mask (B, T) bool (True on real tokens) and loss_mask (B, T) bool,
    with T the longest row. loss_mask follows next-token prediction, where logits[:, t] predict ids[:, t+1]:
    loss_mask[:, t] is True iff ids[:, t+1] is an answer token (after [A], up to and including [EOS]). So the [A]
    position itself is True, the last real token is False and padding is never in the loss.
    """
    rows = [fit_interaction(tokenizer, r["query"], r["answer"], max_len) for r in records]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    attn_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (row, a_pos) in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        attn_mask[b, :len(row)] = True
        loss_mask[b, a_pos:len(row) - 1] = True  # targets a_pos+1 .. len-1: the answer tokens
    return ids, attn_mask, loss_mask


def collate_queries(tokenizer, queries, max_len):
    """Right-padded batch of [BOS][Q] query [A] prompts (query cut from the front to fit max_len): ids, attn_mask."""
    rows = []
    for query in queries:
        q = tokenizer.encode(query)
        q = q[max(0, len(q) + 3 - max_len):]
        rows.append([tokenizer.bos_id, tokenizer.q_id] + q + [tokenizer.a_id])
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    attn_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        attn_mask[b, :len(row)] = True
    return ids, attn_mask


def episode_turns(episode):
    """All turns of a memory episode: the first (the facts) followed by its interactions (the last is the probe)."""
    return [{"query": episode["query"], "answer": episode["answer"]}] + list(episode["interactions"])


def episode_batches(episodes, batch_size, shuffle=True, seed=0):
    """
    Yield lists of up to batch_size episodes, all of one distance (so every episode in a batch has the same number
    of turns). With shuffle, the episodes and the order of the batches are shuffled by random.Random(seed).
    """
    rng = random.Random(seed)
    by_distance = {}
    for ep in episodes:
        by_distance.setdefault(len(ep["interactions"]), []).append(ep)
    batches = []
    for d in sorted(by_distance):
        pool = list(by_distance[d])
        if shuffle:
            rng.shuffle(pool)
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    yield from batches
