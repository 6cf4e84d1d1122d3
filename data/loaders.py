"""
Batches, and the one place that formats what the model reads:

    prompt       [BOS] [Q] query [A]                     what the decoder answers (render_query)
    interaction  [BOS] [Q] query [A] answer [EOS]        one turn: SFT, memory writes (render_interaction)

Rows are right-padded with [PAD] into ids (B, T) with attn_mask (B, T) (True on real tokens). Loss targets are
aligned with the logits - targets[:, t] is what logits[:, t] should predict, i.e. ids[:, t + 1] - and hold -100
(ignored) wherever nothing counts: padding, and for interactions everything before the answer.
"""

import numpy as np
import torch

IGNORE = -100  # a target that does not count (F.cross_entropy's ignore_index)


def get_lm_batch(bin_path, batch_size, seq_len, device="cpu", generator=None):
    """
    Random windows (B, T) of a uint16 token file, int64 on device.
    The memmap is re-opened on every call: one long-lived memmap keeps growing in RAM (nanoGPT's fix).
    """
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    if len(data) <= seq_len:
        raise ValueError(f"{bin_path} holds {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + seq_len] for i in ix]).astype(np.int64))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def next_token_targets(ids, counts):
    """targets[:, t] = ids[:, t + 1] where counts[:, t + 1], else IGNORE; the last position predicts nothing."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:].masked_fill(~counts[:, 1:], IGNORE)
    return targets


def mlm_inputs(ids, attn_mask, mask_id, prob, generator=None):
    """Masked-LM inputs: each real (non-pad) token becomes [MASK] with probability prob. Returns the masked ids and
    the targets (the original token where masked, IGNORE elsewhere)."""
    chosen = (torch.rand(ids.shape, generator=generator, device=ids.device) < prob) & attn_mask
    chosen[:, 0] |= ~chosen.any(dim=1) & attn_mask[:, 0]  # never a row with nothing to predict
    return ids.masked_fill(chosen, mask_id), ids.masked_fill(~chosen, IGNORE)


def render_query(tok, query, max_len):
    """[BOS] [Q] query [A], at most max_len tokens: a long query loses its front (the question usually ends it)."""
    q = tok.encode(query)
    return [tok.bos_id, tok.q_id] + q[max(0, len(q) + 3 - max_len):] + [tok.a_id]


def render_interaction(tok, query, answer, max_len):
    """
    [BOS] [Q] query [A] answer [EOS], at most max_len tokens. Returns (ids, index of the first answer token).
    Too long: the query loses its front first. If even [BOS][Q][A] answer [EOS] does not fit, the end of the answer
    is cut and [EOS] dropped: a cut answer must not teach the model to stop mid-sentence.
    """
    a = tok.encode(answer) + [tok.eos_id]
    prompt = render_query(tok, query, max(3, max_len - len(a)))
    return (prompt + a)[:max_len], len(prompt)


def pad_rows(rows, pad_id):
    """Right-pad lists of ids into ids (B, T) int64 and attn_mask (B, T) bool, T = the longest row."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        attn_mask[b, :len(row)] = True
    return ids, attn_mask


def length_chunks(attn_mask, overhead=128):
    """Rows of a right-padded batch (attn_mask (B, T)) in groups of similar length for the model's `chunks`:
    [(rows, n), ...], each group's rows (a LongTensor) and its longest length n. Computed positions cost one each,
    one more group costs `overhead` positions (the fixed cost of running a piece of the batch: kernel launches,
    Python); the grouping of the length-sorted rows that costs least is found exactly (dynamic programming over
    the B cut points). None when one group, the whole padded batch, is cheapest."""
    lengths = attn_mask.sum(dim=1).tolist()
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_len = [lengths[i] for i in order]
    B = len(order)
    best, cut = [0.0] + [float("inf")] * B, [0] * (B + 1)  # best[j]: cheapest grouping of the j shortest rows
    for j in range(1, B + 1):
        for i in range(j):  # the last group is rows i..j-1, padded to the longest of them, sorted_len[j - 1]
            cost = best[i] + (j - i) * sorted_len[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], B
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    if len(groups) == 1 and sorted_len[-1] == attn_mask.size(1):
        return None
    device = attn_mask.device
    return [(torch.tensor(order[i:j], device=device), sorted_len[j - 1]) for i, j in reversed(groups)]


def computed_positions(attn_mask, chunks):
    """How many token positions a batch computes when its rows run in these chunks (None: the padded batch)."""
    return attn_mask.numel() if chunks is None else sum(len(rows) * n for rows, n in chunks)


def collate_interactions(tok, records, max_len):
    """{query, answer} records -> ids, attn_mask, targets (B, T); the targets are the answer tokens and [EOS]."""
    rows = [render_interaction(tok, r["query"], r["answer"], max_len) for r in records]
    ids, attn_mask = pad_rows([row for row, _ in rows], tok.pad_id)
    answer = torch.zeros_like(attn_mask)
    for b, (row, start) in enumerate(rows):
        answer[b, start:len(row)] = True
    return ids, attn_mask, next_token_targets(ids, answer)


def collate_queries(tok, queries, seq_len, max_answer):
    """Prompts for answers of up to max_answer tokens: prompt + answer + [EOS] must fit in one interaction of
    seq_len tokens (the one query budget of chat, evaluation and MRL rollouts). -> ids, attn_mask (B, T)."""
    return pad_rows([render_query(tok, q, seq_len - max_answer - 1) for q in queries], tok.pad_id)


def join_answers(q_ids, q_mask, ans, ans_len, tok):
    """Right-padded interactions `query answer` (B, T), their mask, and the mask of sampled answer positions
    (ans_mask[:, t] True iff ids[:, t+1] was sampled). An answer cut by max_answer gets an [EOS] (not sampled)."""
    rows, spans = [], []
    for b in range(q_ids.size(0)):
        q = q_ids[b, :int(q_mask[b].sum())].tolist()
        a = ans[b, :int(ans_len[b])].tolist()
        rows.append(q + a + ([] if a and a[-1] == tok.eos_id else [tok.eos_id]))
        spans.append((len(q), len(q) + len(a)))
    ids, attn_mask = pad_rows(rows, tok.pad_id)
    ans_mask = torch.zeros_like(attn_mask)
    for b, (start, end) in enumerate(spans):
        ans_mask[b, start - 1:end - 1] = True
    d = q_ids.device
    return ids.to(d), attn_mask.to(d), ans_mask.to(d)


def render_dialogue(tok, turns, max_len, query=None):
    """A conversation as one sequence - every turn `[BOS][Q] query [A] answer [EOS]`, then the prompt of `query` if
    given - which is what a model without memory (the stateless baseline) must re-read every turn. Longer than
    max_len: the oldest turns are dropped, whole. Returns the ids and, per id, whether it belongs to an answer."""
    rows = [render_interaction(tok, t["query"], t["answer"], max_len) for t in turns]
    if query is not None:
        prompt = render_query(tok, query, max_len)
        rows.append((prompt, len(prompt)))
    while len(rows) > 1 and sum(len(row) for row, _ in rows) > max_len:
        rows = rows[1:]
    ids, answer = [], []
    for row, start in rows:
        ids += row
        answer += [False] * start + [True] * (len(row) - start)
    return ids, answer


def collate_dialogues(tok, episodes, max_len):
    """Whole episodes as one sequence each -> ids, attn_mask, targets (B, T): the answer tokens of every turn."""
    rows = [render_dialogue(tok, episode_turns(ep), max_len) for ep in episodes]
    ids, attn_mask = pad_rows([ids for ids, _ in rows], tok.pad_id)
    answer = torch.zeros_like(attn_mask)
    for b, (_, flags) in enumerate(rows):
        answer[b, :len(flags)] = torch.tensor(flags)
    return ids, attn_mask, next_token_targets(ids, answer)


def episode_turns(episode):
    """All turns of a memory episode: the first (the facts) followed by its interactions (the last is the probe)."""
    return [{"query": episode["query"], "answer": episode["answer"]}] + list(episode["interactions"])


def episode_tensors(tok, episodes, max_len, device, pad_to=None):
    """Per turn of a batch of equally long episodes: (ids, attn_mask, targets), each (B, T) on device.
    pad_to: pad every turn to at least this many tokens."""
    turns, out = [episode_turns(ep) for ep in episodes], []
    for t in range(len(turns[0])):
        ids, attn_mask, targets = collate_interactions(tok, [tr[t] for tr in turns], max_len)
        if pad_to is not None and ids.size(1) < pad_to:
            extra = pad_to - ids.size(1)
            ids = torch.nn.functional.pad(ids, (0, extra), value=tok.pad_id)
            attn_mask = torch.nn.functional.pad(attn_mask, (0, extra))
            targets = torch.nn.functional.pad(targets, (0, extra), value=IGNORE)
        out.append((ids.to(device), attn_mask.to(device), targets.to(device)))
    return out


REJECTED_KINDS = ("binding", "overwrite", "other", "own")


def rejected_answer(episode, mix, values, g):
    """A wrong answer to the episode's probe for a preference pair, of a kind drawn with the weights of `mix`
    among those the episode has: the other person's value of the same slot (binding), the value before the change
    (overwrite), another value of the slot (other, always there; `values` are the slot's values), or "own": the
    model's own wrong answer, which only the model can give (returned as None for the caller to fill in).
    Returns (kind, text or None)."""
    rivals = episode.get("rivals") or {}
    kinds = [k for k in REJECTED_KINDS if mix.get(k, 0) > 0 and (k in ("other", "own") or k in rivals)]
    kinds = kinds or ["other"]
    weights = torch.tensor([float(mix.get(k, 1.0)) for k in kinds])
    kind = kinds[torch.multinomial(weights, 1, generator=g).item()]
    if kind == "other":
        others = [v for v in values if v != episode["gold"]]
        return kind, others[torch.randint(len(others), (1,), generator=g).item()]
    return kind, rivals.get(kind)


def episode_pools(episodes, n_val, by_length=False):
    """{"train" | "val": {distance: episodes}}, the first n_val episodes for validation. by_length: each pool sorted
    by its episodes' longest turn, so that a batch drawn from neighbours pads every turn less (train_mrl's
    length_buckets); else in file order."""
    pools = {"train": {}, "val": {}}
    for i, ep in enumerate(episodes):
        pools["val" if i < n_val else "train"].setdefault(ep["distance"], []).append(ep)
    for pool in [p for split in pools.values() for p in split.values()] if by_length else []:
        pool.sort(key=lambda ep: max(len(t["query"]) + len(t["answer"]) for t in [ep] + ep["interactions"]))
    return pools
