"""Rows run in groups of similar length (chunks) give what the padded batch gives: losses, the MoE balancing loss,
outputs and gradients - only the padding is no longer computed."""

import torch
import torch.nn.functional as F

import train_mrl
from data.loaders import computed_positions, length_chunks, pad_rows
from model import ReactiveTransformer, get_config
from tests.conftest import TINY


def mixed_batch(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    ids, attn_mask = pad_rows(rows, 0)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(~attn_mask[:, 1:], -100)
    targets[:, :2] = -100  # a "query" that does not count
    return ids, attn_mask, targets


def model_and_grads(seed=0):
    torch.manual_seed(seed)
    return ReactiveTransformer(get_config("nano", vocab_size=64, **TINY))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.allclose(a[n], b[n], atol=tol, rtol=1e-4), n


LENGTHS = [5, 40, 7, 33, 12, 6, 38, 9]


def test_length_chunks_group_rows_by_length_and_cover_each_row_once():
    _, attn_mask, _ = mixed_batch(LENGTHS)
    chunks = length_chunks(attn_mask, overhead=8)
    rows = torch.cat([r for r, _ in chunks]).sort().values
    assert rows.tolist() == list(range(len(LENGTHS)))
    for r, n in chunks:
        assert n == max(LENGTHS[i] for i in r.tolist())
    assert computed_positions(attn_mask, chunks) < 0.7 * computed_positions(attn_mask, None)
    assert length_chunks(attn_mask, overhead=10_000) is None  # one group is cheapest: the padded batch
    assert length_chunks(pad_rows([[1] * 6] * 4, 0)[1]) is None  # equal rows: nothing to skip


def test_decode_in_chunks_gives_the_padded_loss_balancing_loss_and_gradients():
    ids, attn_mask, targets = mixed_batch(LENGTHS)
    chunks = length_chunks(attn_mask, overhead=8)
    assert len(chunks) > 1
    out = []
    for c in (None, chunks):
        model = model_and_grads()
        stm = model.new_memory(len(LENGTHS), generator=torch.Generator().manual_seed(1))
        logits, loss, aux = model.decode(ids, stm, targets=targets, attn_mask=attn_mask, chunks=c)
        (loss + aux).backward()
        out.append((logits, loss, aux, grads(model)))
    (l0, loss0, aux0, g0), (l1, loss1, aux1, g1) = out
    # the loss is the mean over the counted targets only (the query and the padding do not count)
    torch.testing.assert_close(loss0, F.cross_entropy(l0.flatten(0, 1), targets.flatten(), ignore_index=-100))
    assert torch.allclose(loss0, loss1, atol=1e-6) and torch.allclose(aux0, aux1, atol=1e-6)
    assert torch.allclose(l0[attn_mask], l1[attn_mask], atol=1e-5)  # every real position, in the batch's order
    assert_same(g0, g1)


def test_mlm_and_memory_write_in_chunks_equal_the_padded_batch():
    ids, attn_mask, targets = mixed_batch(LENGTHS)
    chunks = length_chunks(attn_mask, overhead=8)
    out = []
    for c in (None, chunks):
        model = model_and_grads()
        stm = model.new_memory(len(LENGTHS), generator=torch.Generator().manual_seed(1))
        ed, mlm_loss, mlm_acc = model.mlm(ids, attn_mask, targets, c)
        new = model.update_memory(stm, ids, attn_mask, c)
        (mlm_loss + new.pow(2).mean() + ed[:, attn_mask].pow(2).mean()).backward()
        out.append((ed[:, attn_mask], mlm_loss, mlm_acc, new, grads(model)))
    for a, b in zip(out[0][:4], out[1][:4]):
        assert torch.allclose(a, b, atol=1e-5)
    assert_same(out[0][4], out[1][4])


def test_smat_episode_in_chunks_gives_the_padded_loss_and_gradients():
    episode = [mixed_batch(LENGTHS[i:] + LENGTHS[:i], seed=i) for i in range(3)]  # 3 turns, lengths in every order
    out = []
    for chunked in (False, True):
        model = model_and_grads()
        cfg = dict(train_mrl.DEFAULTS, chunks=chunked, smat_detach_stm=False)
        loss, metrics = train_mrl.smat_loss(model, episode, cfg, torch.Generator().manual_seed(3))
        loss.backward()
        out.append((loss, metrics["probe_acc"], grads(model)))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5) and out[0][1] == out[1][1]
    assert_same(out[0][2], out[1][2])


def test_joint_decode_reading_another_rows_ed_in_chunks_equals_the_padded_batch():
    """Joint training and SFT: the decoder reads an encoded interaction with its padding mask - with ed_swap another
    row's, of another length - so each chunk cuts that memory to its own longest row, never shorter."""
    ids, attn_mask, targets = mixed_batch(LENGTHS)
    chunks = length_chunks(attn_mask, overhead=8)
    other = torch.roll(torch.arange(len(LENGTHS)), 1)  # each row reads the previous row's encoding (ed_swap)
    out = []
    for c in (None, chunks):
        model = model_and_grads()
        ed, mlm_loss, _ = model.mlm(ids, attn_mask, targets, c)
        logits, loss, aux = model.decode(ids, ed.detach()[:, other], attn_mask[other], targets, attn_mask, c)
        (loss + aux + mlm_loss).backward()
        out.append((logits[attn_mask], loss, aux, grads(model)))
    for a, b in zip(out[0][:3], out[1][:3]):
        assert torch.allclose(a, b, atol=1e-5)
    assert_same(out[0][3], out[1][3])
