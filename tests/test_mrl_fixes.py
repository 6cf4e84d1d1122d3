"""Issue 11: the three bugs that silenced MRL, SMAT decoding turn 1, and IMPO's policy-stability KL."""

import os

import torch

import rl
import train_mrl
from conftest import TINY
from data.loaders import episode_tensors
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, get_config


def setup(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    return tok, ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))


def padded(rows, value, device="cpu"):
    L = max(map(len, rows))
    return torch.tensor([r + [value] * (L - len(r)) for r in rows], device=device)


def test_exact_probe_answer_gets_the_maximum_reward_and_a_wrong_one_less(world):
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS, mrl_bleu_weight=0.5, mrl_recall_weight=2.0)  # unequal: each weight its own term
    ref = [tok.encode("red") + [tok.eos_id], tok.encode("red") + [tok.eos_id]]
    ref_ids = padded(ref, tok.pad_id)
    ref_mask = ref_ids != tok.pad_id
    right, wrong = tok.encode("red") + [tok.eos_id], tok.encode("blue") + [tok.eos_id]
    ans = padded([right, wrong], tok.pad_id)
    ans_len = torch.tensor([len(right), len(wrong)])
    r = rl.rewards(model, ans, ans_len, ref_ids.masked_fill(~ref_mask, -1), ref_mask, True, cfg, tok)
    assert r[0].item() == cfg["mrl_bleu_weight"] + cfg["mrl_recall_weight"]  # BLEU 1 + exact match 1
    assert r[1].item() < r[0].item() - cfg["mrl_recall_weight"] + 1e-6


def test_cosine_reward_handles_references_of_different_lengths(world):
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS, mrl_bleu_weight=0.0, mrl_recall_weight=0.0, mrl_cosine_weight=1.0)
    rows = [tok.encode("red") + [tok.eos_id], tok.encode("Mia has a red ball.") + [tok.eos_id]]
    ref_ids = padded(rows, tok.pad_id)
    ref_mask = ref_ids != tok.pad_id
    ans, ans_len = ref_ids.clone(), ref_mask.sum(1)
    r = rl.rewards(model, ans, ans_len, ref_ids.masked_fill(~ref_mask, -1), ref_mask, False, cfg, tok)
    torch.testing.assert_close(r, torch.ones(2), atol=1e-5, rtol=0)


def test_the_policy_loss_sends_gradient_to_memory_attention_and_encoder(world):
    """The decoder answers from the memory the last write produced, with gradients: the policy loss alone (the
    memory regulariser off, every other setting the default) must reach the write path."""
    from test_mrl import colour_episodes
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, mrl_max_answer=4, mrl_reset_prob=0.0, mrl_memory_reg=0.0)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, colour_episodes(8, seed=0) * 1, tok, cfg, torch.Generator().manual_seed(0))
    loss, _ = rl.impo_loss(model, critic, play, cfg)
    loss.backward()
    norm = lambda m: torch.sqrt(sum((p.grad ** 2).sum() for p in m.parameters() if p.grad is not None)).item()
    assert norm(model.memory_attention) > 0 and norm(model.encoder) > 0 and norm(model.decoder) > 0


def test_smat_loss_decodes_the_first_turn_from_a_fresh_memory(world, monkeypatch):
    """With writes that keep the memory as it was, only decoding turn 1 itself can make its answer matter."""
    from test_mrl import colour_episodes
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS, seq_len=64)
    monkeypatch.setattr(model, "update_memory", lambda stm, ids, mask=None, chunks=None: stm)
    episodes = colour_episodes(4, seed=0)
    changed = [dict(ep, answer="Mia has a green kite and a very long story to tell.") for ep in episodes]
    losses = []
    for eps in (episodes, changed):
        loss, _ = train_mrl.smat_loss(model, episode_tensors(tok, eps, 64, "cpu"), cfg,
                                      torch.Generator().manual_seed(0))
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) > 1e-3, losses


def test_policy_stability_kl_is_zero_for_an_unchanged_policy_and_positive_after_an_update(world):
    from test_mrl import colour_episodes
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, mrl_max_answer=4, mrl_reset_prob=0.0)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, colour_episodes(8, seed=0), tok, cfg, torch.Generator().manual_seed(0))
    _, first = rl.impo_loss(model, critic, play, cfg)  # the rollout's policy: nothing changed yet
    assert first["kl"] == 0.0 and abs(first["ratio"] - 1) < 1e-6
    with torch.no_grad():
        model.decoder.lm_head.weight.add_(0.05 * torch.randn_like(model.decoder.lm_head.weight))
    _, second = rl.impo_loss(model, critic, play, cfg)
    assert second["kl"] > 1e-4, second["kl"]
    assert abs(second["ratio"] - 1) > 1e-4, second["ratio"]  # the surrogate's ratio is against the rollout's policy


def test_an_answer_cut_before_its_eos_is_not_an_exact_match(world):
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS)
    ref_ids = padded([tok.encode("red") + [tok.eos_id]], tok.pad_id)
    ref_mask = ref_ids != tok.pad_id
    cut = tok.encode("red")  # max_answer reached before [EOS]
    r = rl.rewards(model, padded([cut], tok.pad_id), torch.tensor([len(cut)]), ref_ids, ref_mask, True, cfg, tok)
    assert r.item() < cfg["mrl_recall_weight"]  # BLEU only, no exact match
