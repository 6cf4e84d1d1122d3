import numpy as np
import pytest
import torch

from data.loaders import collate_interactions, collate_queries, episode_batches, episode_turns, get_lm_batch
from data.memory_world import make_episodes, make_interactions
from data.tokenizer import Tokenizer, train_bpe

RECORDS = [{"query": "Mia has a red ball. What colour is Mia's ball?", "answer": "red"},
           {"query": "Hi!", "answer": "Hello! How are you today, my friend?"},
           {"query": "Tell me a story.", "answer": "Once upon a time, Tom had a cat called Spot. The end."}]


@pytest.fixture(scope="module")
def tok():
    texts = [t for r in make_interactions(300, 0) + RECORDS for t in r.values()]
    return Tokenizer(train_bpe(texts, 400, verbose=False))


def answer_targets(tok, ids, attn_mask):
    """Positions t whose next token ids[t + 1] lies after [A]: the reference for loss_mask."""
    want = torch.zeros_like(attn_mask)
    for b in range(ids.shape[0]):
        row = ids[b][attn_mask[b]].tolist()
        a = row.index(tok.a_id)
        want[b, a:len(row) - 1] = True
    return want


def test_interaction_batch_layout_and_answer_only_loss(tok):
    ids, attn_mask, loss_mask = collate_interactions(tok, RECORDS, max_len=64)
    rows = [tok.encode_interaction(r["query"], r["answer"]) for r in RECORDS]
    assert ids.shape == attn_mask.shape == loss_mask.shape == (3, max(map(len, rows)))
    assert ids.dtype == torch.long and attn_mask.dtype == loss_mask.dtype == torch.bool
    for b, row in enumerate(rows):
        assert ids[b, :len(row)].tolist() == row  # right-padded
        assert (ids[b, len(row):] == tok.pad_id).all() and attn_mask[b].sum() == len(row)
        # the targets of the loss are exactly the answer tokens and [EOS]
        targets = ids[b, 1:][loss_mask[b, :-1]].tolist()
        assert targets == tok.encode(RECORDS[b]["answer"]) + [tok.eos_id]
    assert not loss_mask[:, -1].any()
    assert not (loss_mask & ~attn_mask).any()  # pads never in the loss
    assert torch.equal(loss_mask, answer_targets(tok, ids, attn_mask))


def test_long_interactions_lose_the_front_of_the_query_first(tok):
    record = {"query": "Tom is at the park. " * 20 + "Where is Tom?", "answer": "park"}
    ids, attn_mask, loss_mask = collate_interactions(tok, [record], max_len=24)
    row = ids[0].tolist()
    assert len(row) == 24 and row[:2] == [tok.bos_id, tok.q_id] and row[-1] == tok.eos_id
    assert tok.decode(row).endswith("Where is Tom?[A]park[EOS]")
    assert ids[0, 1:][loss_mask[0, :-1]].tolist() == tok.encode("park") + [tok.eos_id]


def test_an_answer_too_long_to_fit_is_cut_without_eos(tok):
    record = {"query": "Tell me a story.", "answer": "Tom had a cat. " * 30}
    ids, attn_mask, loss_mask = collate_interactions(tok, [record], max_len=20)
    row = ids[0].tolist()
    assert len(row) == 20 and tok.eos_id not in row and tok.a_id in row
    assert loss_mask[0].sum() == 20 - 1 - row.index(tok.a_id)


def test_query_batch_is_right_padded_prompts(tok):
    queries = ["Where is Mia?", "Mia has a red ball. What colour is Mia's ball?"]
    ids, attn_mask = collate_queries(tok, queries, max_len=64)
    for b, q in enumerate(queries):
        row = tok.encode_query(q)
        assert ids[b, :len(row)].tolist() == row and attn_mask[b].sum() == len(row)
        assert (ids[b, len(row):] == tok.pad_id).all()
    ids, _ = collate_queries(tok, ["Tom is at the park. " * 20 + "Where is Tom?"], max_len=12)
    assert ids.shape == (1, 12) and tok.decode(ids[0].tolist()).endswith("Where is Tom?[A]")


def test_lm_batch_windows_are_shifted_by_one(tmp_path):
    path = str(tmp_path / "x.bin")
    np.arange(1000, dtype=np.uint16).tofile(path)
    g = torch.Generator().manual_seed(0)
    x, y = get_lm_batch(path, batch_size=8, seq_len=32, generator=g)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    x2, _ = get_lm_batch(path, 8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # the generator makes batches reproducible
    with pytest.raises(ValueError, match="fewer than"):
        get_lm_batch(path, 2, 1000)


def test_episode_batches_hold_one_distance_and_cover_every_episode():
    episodes = make_episodes(150, seed=0)
    batches = list(episode_batches(episodes, batch_size=8, shuffle=True, seed=1))
    assert all(len({len(episode_turns(ep)) for ep in batch}) == 1 for batch in batches)
    assert sorted(id(ep) for batch in batches for ep in batch) == sorted(id(ep) for ep in episodes)
    assert [len(b) for b in batches] == [len(b) for b in episode_batches(episodes, 8, True, 1)]
    assert all(len(b) <= 8 for b in batches)
