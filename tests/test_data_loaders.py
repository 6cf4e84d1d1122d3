import os

import numpy as np
import pytest
import torch

from data.loaders import (IGNORE, collate_interactions, collate_queries, episode_tensors, episode_turns, get_lm_batch,
                          join_answers, mlm_inputs)
from data.memory_world import make_episodes, make_interactions
from data.tokenizer import Tokenizer, train_bpe

RECORDS = [{"query": "Mia has a red ball. What colour is Mia's ball?", "answer": "red"},
           {"query": "Hi!", "answer": "Hello! How are you today, my friend?"},
           {"query": "Tell me a story.", "answer": "Once upon a time, Tom had a cat called Spot. The end."}]


@pytest.fixture(scope="module")
def tok():
    texts = [t for r in make_interactions(300, 0) + RECORDS for t in r.values()]
    return Tokenizer(train_bpe(texts, 400, verbose=False))


def interaction(tok, query, answer):
    """The layout written out by hand: [BOS] [Q] query [A] answer [EOS]."""
    return [tok.bos_id, tok.q_id] + tok.encode(query) + [tok.a_id] + tok.encode(answer) + [tok.eos_id]


def test_interaction_batch_layout_and_answer_only_targets(tok):
    ids, attn_mask, targets = collate_interactions(tok, RECORDS, max_len=64)
    rows = [interaction(tok, r["query"], r["answer"]) for r in RECORDS]
    assert ids.shape == attn_mask.shape == targets.shape == (3, max(map(len, rows)))
    assert ids.dtype == targets.dtype == torch.long and attn_mask.dtype == torch.bool
    for b, row in enumerate(rows):
        assert ids[b, :len(row)].tolist() == row  # right-padded
        assert (ids[b, len(row):] == tok.pad_id).all() and attn_mask[b].sum() == len(row)
        # the targets are exactly the answer tokens and [EOS], each at the position that predicts it
        counted = targets[b] != IGNORE
        assert targets[b][counted].tolist() == tok.encode(RECORDS[b]["answer"]) + [tok.eos_id]
        assert torch.equal(targets[b, :-1][counted[:-1]], ids[b, 1:][counted[:-1]])
        assert counted.nonzero()[0].item() == row.index(tok.a_id)  # [A] predicts the first answer token
    assert (targets[:, -1] == IGNORE).all() and (targets[~attn_mask] == IGNORE).all()  # pads never count


def test_long_interactions_lose_the_front_of_the_query_first(tok):
    record = {"query": "Tom is at the park. " * 20 + "Where is Tom?", "answer": "park"}
    ids, attn_mask, targets = collate_interactions(tok, [record], max_len=24)
    row = ids[0].tolist()
    assert len(row) == 24 and row[:2] == [tok.bos_id, tok.q_id] and row[-1] == tok.eos_id
    assert tok.decode(row).endswith("Where is Tom?[A]park[EOS]")
    assert targets[0][targets[0] != IGNORE].tolist() == tok.encode("park") + [tok.eos_id]


def test_an_answer_too_long_to_fit_is_cut_without_eos(tok):
    record = {"query": "Tell me a story.", "answer": "Tom had a cat. " * 30}
    ids, attn_mask, targets = collate_interactions(tok, [record], max_len=20)
    row = ids[0].tolist()
    assert len(row) == 20 and tok.eos_id not in row and tok.a_id in row
    assert (targets[0] != IGNORE).sum() == 20 - 1 - row.index(tok.a_id)


def test_query_batch_is_right_padded_prompts_that_leave_room_for_the_answer(tok):
    queries = ["Where is Mia?", "Mia has a red ball. What colour is Mia's ball?"]
    ids, attn_mask = collate_queries(tok, queries, seq_len=64, max_answer=16)
    for b, q in enumerate(queries):
        row = [tok.bos_id, tok.q_id] + tok.encode(q) + [tok.a_id]
        assert ids[b, :len(row)].tolist() == row and attn_mask[b].sum() == len(row)
        assert (ids[b, len(row):] == tok.pad_id).all()
    ids, _ = collate_queries(tok, ["Tom is at the park. " * 20 + "Where is Tom?"], seq_len=20, max_answer=7)
    assert ids.shape == (1, 12)  # prompt + 7 answer tokens + [EOS] = 20
    assert tok.decode(ids[0].tolist()).endswith("Where is Tom?[A]")


def test_lm_batch_windows_are_contiguous_and_reproducible(tmp_path):
    path = str(tmp_path / "x.bin")
    np.arange(1000, dtype=np.uint16).tofile(path)
    x = get_lm_batch(path, batch_size=8, seq_len=32, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert torch.equal(x, get_lm_batch(path, 8, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="fewer than"):
        get_lm_batch(path, 2, 1000)


def test_mlm_inputs_mask_only_real_tokens_and_keep_the_originals_as_targets():
    ids = torch.randint(10, 100, (64, 40))
    attn_mask = torch.ones_like(ids, dtype=torch.bool)
    attn_mask[:, 30:] = False
    masked, targets = mlm_inputs(ids, attn_mask, mask_id=5, prob=0.15, generator=torch.Generator().manual_seed(0))
    chosen = masked == 5
    assert torch.equal(chosen, targets != IGNORE) and not chosen[:, 30:].any()
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert 0.1 < chosen[:, :30].float().mean() < 0.2 and chosen.any(dim=1).all()


def test_episode_tensors_give_one_batch_per_turn(tok):
    episodes = [ep for ep in make_episodes(60, seed=0) if ep["distance"] == 2][:5]
    turns = episode_tensors(tok, episodes, 64, "cpu")
    assert len(turns) == len(episode_turns(episodes[0])) == 3
    for t, (ids, attn_mask, targets) in enumerate(turns):
        want = collate_interactions(tok, [episode_turns(ep)[t] for ep in episodes], 64)
        assert all(torch.equal(a, b) for a, b in zip((ids, attn_mask, targets), want))


def test_join_answers_marks_exactly_the_sampled_tokens(tok):
    q_ids, q_mask = collate_queries(tok, ["Hi!", "Where is Mia?"], seq_len=64, max_answer=8)
    a0, a1 = tok.encode("Hello there") + [tok.eos_id], tok.encode("park park park")  # the second was cut: no [EOS]
    n = max(len(a0), len(a1))
    ans = torch.tensor([a0 + [0] * (n - len(a0)), a1 + [0] * (n - len(a1))])  # whatever follows a length is unused
    ids, attn_mask, ans_mask = join_answers(q_ids, q_mask, ans, torch.tensor([len(a0), len(a1)]), tok)
    for b, a in enumerate([a0, a1]):
        row = ids[b][attn_mask[b]].tolist()
        assert row[-1] == tok.eos_id and ids[b, 1:][ans_mask[b, :-1]].tolist() == a


def test_an_answer_that_ends_with_eos_gets_no_second_one(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    q_ids, q_mask = collate_queries(tok, ["Hi!"], 64, 8)
    a = tok.encode("Hello") + [tok.eos_id]
    ids, attn_mask, _ = join_answers(q_ids, q_mask, torch.tensor([a]), torch.tensor([len(a)]), tok)
    assert ids[0][attn_mask[0]].tolist() == q_ids[0][q_mask[0]].tolist() + a


def test_mlm_masks_the_first_token_only_as_often_as_any_other_unless_nothing_else_was_chosen():
    ids = torch.arange(2000 * 40).view(2000, 40) % 50 + 10
    mask = torch.ones_like(ids, dtype=torch.bool)
    masked, targets = mlm_inputs(ids, mask, 3, 0.15, torch.Generator().manual_seed(0))
    chosen = masked == 3
    assert abs(chosen[:, 0].float().mean().item() - 0.15) < 0.03 and abs(chosen.float().mean().item() - 0.15) < 0.01
    few, _ = mlm_inputs(ids[:200, :4], mask[:200, :4], 3, 0.01, torch.Generator().manual_seed(0))
    assert ((few == 3).sum(dim=1) >= 1).all()  # a row whose draws chose nothing still gets one token to predict


def test_episode_tensors_pad_to_adds_padding_that_is_masked_and_has_no_target():
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    eps = [{"query": "ab", "answer": "c", "distance": 1, "interactions": [{"query": "d?", "answer": "e"}]}]
    short = episode_tensors(tok, eps, 32, "cpu")
    long = episode_tensors(tok, eps, 32, "cpu", pad_to=24)
    for (ids, mask, targets), (pids, pmask, ptargets) in zip(short, long):
        n = ids.size(1)
        assert pids.size(1) == 24 and torch.equal(pmask[:, :n], mask) and not pmask[:, n:].any()
        assert (pids[:, n:] == tok.pad_id).all() and (ptargets[:, n:] == IGNORE).all()
