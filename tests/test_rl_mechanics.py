"""The RL stage's mechanics, each observed directly: the signs of IMPO's terms, what a rollout writes into memory,
the reference it is scored against, the random reset's direction and what the critic reads."""

import os

import pytest
import torch

import engine
import rl
import train_mrl
from conftest import TINY, tiny_flags
from data.loaders import collate_interactions, episode_turns, render_query
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, get_config
from scores import bleu
from test_mrl import colour_episodes


def setup(world, **cfg):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, mrl_max_answer=4, mrl_reset_prob=0.0, **cfg)
    return tok, model, cfg


def episodes(n=6):
    eps = colour_episodes(n, seed=0)
    return [dict(ep, interactions=[{"query": "Hello there.", "answer": "Hello."}] + ep["interactions"]) for ep in eps]


def test_the_entropy_bonus_lowers_the_loss_and_the_policy_kl_raises_it(world):
    tok, model, cfg = setup(world, mrl_memory_reg=0.0, mrl_value_coef=0.0)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the policy moves after the rollout: KL(pi_old || pi) > 0
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = lambda **kw: rl.impo_loss(model, critic, play, dict(cfg, **kw))
    base, _ = loss(mrl_entropy_coef=0.0, mrl_kl_coef=0.0)
    with_entropy, _ = loss(mrl_entropy_coef=1.0, mrl_kl_coef=0.0)
    with_kl, metrics = loss(mrl_entropy_coef=0.0, mrl_kl_coef=1.0)
    assert with_entropy.item() < base.item() - 1.0  # a bonus: the untrained policy's entropy is several nats
    assert metrics["kl"] > 0 and with_kl.item() - base.item() == pytest.approx(metrics["kl"], rel=1e-3)


def test_a_rollout_answers_from_the_stm_so_far_writes_its_own_answers_and_scores_them_with_eos(world, monkeypatch):
    tok, model, cfg = setup(world)
    writes, written, read, sampled, refs = [], [], [], [], []
    real_update, real_generate = model.update_memory, engine.generate

    def update(stm, ids, attn_mask=None, chunks=None):
        writes.append(ids.clone())
        written.append(real_update(stm, ids, attn_mask, chunks))
        return written[-1]

    def generate(*args, **kw):
        assert kw["eos_id"] == tok.eos_id  # a sampled answer ends at its [EOS], as it would in a chat
        read.append(args[3] if len(args) > 3 else kw.get("stm"))
        out = real_generate(*args, **kw)
        sampled.append(out)
        return out

    def reward_fn(model, ans, ans_len, ref_ids, ref_mask, is_probe, cfg, tok):
        refs.append((ref_ids, ref_mask, is_probe))
        return torch.zeros(ans.size(0))

    monkeypatch.setattr(model, "update_memory", update)
    monkeypatch.setattr(engine, "generate", generate)
    eps = episodes()
    play = rl.rollout(model, eps, tok, cfg, torch.Generator().manual_seed(0), reward_fn=reward_fn)
    assert len(writes) == 3 and len(play["steps"]) == 2  # the facts as given, then each turn as the model played it
    facts = collate_interactions(tok, [episode_turns(ep)[0] for ep in eps], cfg["seq_len"])[0]
    assert torch.equal(writes[0], facts)  # the first write is the facts turn, reference answer and all
    for t, (s, (ans, ans_len)) in enumerate(zip(play["steps"], sampled), start=1):
        assert torch.equal(writes[t], s["ids"])
        assert read[t - 1] is not None and torch.equal(read[t - 1], written[t - 1])  # turn t answers from the STM so far
        for b in range(len(eps)):  # turn t asks turn t's own query
            query = render_query(tok, episode_turns(eps[b])[t]["query"], cfg["seq_len"] - cfg["mrl_max_answer"] - 1)
            assert s["q_ids"][b][s["q_mask"][b]].tolist() == query
            q = int(s["q_mask"][b].sum())
            assert s["ids"][b, q:q + int(ans_len[b])].tolist() == ans[b, :int(ans_len[b])].tolist()
            # IMPO's terms count the answer only: the mask marks the positions predicting the sampled tokens
            assert s["ans_mask"][b].nonzero().flatten().tolist() == list(range(q - 1, q - 1 + int(ans_len[b])))
    assert [probe for _, _, probe in refs] == [False, True]  # only the last turn is the question (recall reward)
    for (ref_ids, ref_mask, _), t in zip(refs, (1, 2)):
        for b, ep in enumerate(eps):
            answer = episode_turns(ep)[t]["answer"]
            assert ref_ids[b][ref_mask[b]].tolist() == tok.encode(answer) + [tok.eos_id]


def test_a_random_reset_starts_the_rollout_from_noise_of_the_reset_std(world):
    tok, model, cfg = setup(world, mrl_reset_std=0.5)
    stds = {}
    for prob in (0.0, 1.0):
        play = rl.rollout(model, episodes(), tok, dict(cfg, mrl_reset_prob=prob), torch.Generator().manual_seed(0))
        stds[prob] = play["stm0"].std().item()
    assert stds[0.0] == pytest.approx(model.cfg.stm_init_std, rel=0.2) and stds[1.0] == pytest.approx(0.5, rel=0.1)


def test_the_critic_reads_the_turns_query_and_the_memory_the_decoder_reads(world, monkeypatch):
    tok, model, cfg = setup(world)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    seen, real = [], critic.forward
    monkeypatch.setattr(critic, "forward", lambda ids, mask, stm: seen.append((ids, mask, stm)) or real(ids, mask, stm))
    rl.impo_loss(model, critic, play, cfg)
    stm = model.update_memory(play["stm0"], *play["first"])
    for (ids, mask, read), s in zip(seen, play["steps"]):
        assert torch.equal(ids, s["q_ids"]) and torch.equal(mask, s["q_mask"])
        torch.testing.assert_close(read, stm)
        assert not read.requires_grad  # the value loss must not train the memory
        stm = model.update_memory(stm, s["ids"], s["mask"])


def test_the_policy_loss_reaches_exactly_the_sampled_answer_positions(world):
    tok, model, cfg = setup(world, chunks=False, mrl_value_coef=0.0, mrl_memory_reg=0.0, mrl_kl_coef=0.0,
                            mrl_entropy_coef=1.0)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    logits = []

    def keep(module, inputs, out):  # a forward hook that returns None leaves the output as it is
        out.retain_grad()
        logits.append(out)
    hook = model.decoder.lm_head.register_forward_hook(keep)
    loss, _ = rl.impo_loss(model, critic, play, cfg)
    hook.remove()
    loss.backward()
    assert len(logits) == len(play["steps"])
    for s, lg in zip(play["steps"], logits):
        touched = lg.grad.abs().sum(dim=-1)[:, :-1] > 0  # logits[:, t] scores ids[:, t + 1]
        assert torch.equal(touched, s["ans_mask"][:, :-1])


def test_a_reward_every_row_shares_teaches_nothing(world):  # advantages are centred over the batch
    tok, model, cfg = setup(world, mrl_value_coef=0.0, mrl_memory_reg=0.0, mrl_kl_coef=0.0, mrl_entropy_coef=0.0)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    for s in play["steps"]:
        s["reward"] = torch.full_like(s["reward"], 0.5)
    with torch.no_grad():  # the critic says 0 for every row: every advantage is exactly 0.5
        critic.head[-1].weight.zero_()
        critic.head[-1].bias.zero_()
    loss, _ = rl.impo_loss(model, critic, play, cfg)
    assert abs(loss.item()) < 1e-4


def test_mrl_detaches_each_writes_input_only_when_asked(world, monkeypatch):
    tok, model, cfg = setup(world)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    inputs, real = [], model.update_memory
    monkeypatch.setattr(model, "update_memory", lambda stm, *a: inputs.append(stm.requires_grad) or real(stm, *a))
    for detach in (True, False):
        inputs.clear()
        rl.impo_loss(model, critic, play, dict(cfg, mrl_detach_stm=detach))
        assert inputs == [False] + [not detach] * len(play["steps"]), detach  # the first: the rollout's fresh STM


def test_the_value_loss_trains_the_critic_and_mrl_hands_the_critic_to_the_optimizer(world, monkeypatch):
    tok, model, cfg = setup(world, mrl_value_coef=1.0)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    loss, _ = rl.impo_loss(model, critic, play, cfg)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.head.parameters())
    seen = {}
    monkeypatch.setattr(train_mrl.training, "train", lambda cfg, model, **kw: seen.update(kw) or {})
    train_mrl.train_mrl(cfg, model, tok, None, torch.device("cpu"), None, 0, 1)
    optimised = {id(p) for p in seen["params"]}
    assert all(id(p) in optimised for p in seen["extra_modules"]["critic"].parameters())


def test_a_short_phase_warms_up_over_a_tenth_of_its_steps(world, tmp_path, monkeypatch):
    """A phase shorter than the warmup would never reach its lr: its warmup is cut to a tenth of its steps."""
    seen = {}
    monkeypatch.setitem(train_mrl.TRAIN, "smat", lambda pcfg, *a: seen.update(pcfg) or {})
    train_mrl.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), phases="smat", smat_iters=20, warmup_iters=100,
                              smat_curriculum=[[1]]))
    assert seen["max_iters"] == 20 and seen["warmup_iters"] == 2 and seen["lr"] == train_mrl.DEFAULTS["smat_lr"]
    assert seen["min_lr"] == pytest.approx(seen["lr"] / 10)  # each phase decays to a tenth of its lr


def test_each_memory_phase_trains_at_its_own_lr(world, tmp_path, monkeypatch):
    seen = {}
    for phase in train_mrl.PHASES:
        monkeypatch.setitem(train_mrl.TRAIN, phase, lambda pcfg, *a, phase=phase: seen.update({phase: pcfg["lr"]}) or {})
    monkeypatch.setattr(train_mrl.training, "init_model", lambda *a, **kw: None)  # phases chain nothing here
    lrs = {phase: (i + 1) * 1e-4 for i, phase in enumerate(train_mrl.PHASES)}
    for phases in ("mem,smat,mrl", "smat,dmpo"):
        train_mrl.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), phases=phases,
                                  **{f"{p}_lr": lrs[p] for p in phases.split(",")}))
    assert seen == lrs


@pytest.mark.parametrize("buckets", [1, 2])
def test_the_episode_pools_are_sorted_by_length_only_when_batches_come_from_length_buckets(world, tmp_path,
                                                                                          monkeypatch, buckets):
    seen, real = [], train_mrl.episode_pools
    monkeypatch.setattr(train_mrl, "episode_pools", lambda *a, **kw: seen.append(kw.get("by_length")) or real(*a, **kw))
    monkeypatch.setitem(train_mrl.TRAIN, "smat", lambda *a: {})
    train_mrl.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), phases="smat", length_buckets=buckets,
                              smat_curriculum=[[1]]))
    assert seen == [buckets > 1]  # off (1 bucket), the pools and so every draw are exactly those of no buckets


def test_a_length_bucketed_batch_comes_from_one_window_anywhere_in_the_pool():
    pools = {"train": {1: list(range(1000))}}  # a length-sorted pool: neighbours are of similar length
    cfg = dict(max_iters=10, batch_size=8, length_buckets=4)  # windows of 1000 // 4 = 250 episodes
    batches = [train_mrl.episode_batch(cfg, pools, "train", 0, [[1]], torch.Generator().manual_seed(s))
               for s in range(20)]
    assert all(max(b) - min(b) < 250 for b in batches)
    assert min(min(b) for b in batches) < 250 and max(max(b) for b in batches) >= 750  # the windows cover the pool


def test_the_bleu_reward_scores_the_answer_against_the_reference_not_the_reverse(world):
    """BLEU is not symmetric: a short answer that is all in the reference has full precision but a brevity penalty."""
    tok, model, cfg = setup(world, mrl_bleu_weight=1.0, mrl_cosine_weight=0.0)
    ref = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    ans, ans_len, ref_len = torch.tensor([[5, 6, 7]]), torch.tensor([3]), torch.tensor([8])
    r = rl.rewards(model, ans, ans_len, ref, torch.ones_like(ref, dtype=torch.bool), False, cfg, tok)
    assert r.item() == pytest.approx(bleu(ans, ans_len, ref, ref_len).item())
    assert r.item() < bleu(ref, ref_len, ans, ans_len).item() - 0.05


def test_the_cosine_reward_adds_to_bleu_and_recall(world):
    tok, model, cfg = setup(world)
    ans = torch.tensor([[10, 11, tok.eos_id], [12, 13, 14]])
    ans_len = torch.tensor([3, 3])
    ref_ids, ref_mask = torch.tensor([[10, 11, tok.eos_id], [10, 15, tok.eos_id]]), torch.ones(2, 3, dtype=torch.bool)
    r = lambda w: rl.rewards(model, ans, ans_len, ref_ids, ref_mask, True, dict(cfg, mrl_cosine_weight=w), tok)
    base, with_cos = r(0.0), r(1.0)
    assert base[0] > 1.0  # the exact answer: BLEU 1 + recall 1
    cos = with_cos - base  # the cosine of mean embeddings, at most 1
    assert cos[0].item() == pytest.approx(1.0, abs=1e-5) and -1 <= cos[1].item() < 1


def test_impo_clips_at_mrl_clip_eps_and_reports_the_ratio_over_the_answer_tokens(world):
    from model import token_logprobs
    off = dict(mrl_memory_reg=0.0, mrl_value_coef=0.0, mrl_entropy_coef=0.0, mrl_kl_coef=0.0)
    tok, model, cfg = setup(world, **off)
    critic = train_mrl.Critic(model)
    play = rl.rollout(model, episodes(), tok, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the policy moves after the rollout, so that ratios leave 1 and clipping matters
        model.decoder.lm_head.weight.add_(0.3 * torch.randn_like(model.decoder.lm_head.weight))
    losses = {eps: rl.impo_loss(model, critic, play, dict(cfg, mrl_clip_eps=eps))[0].item() for eps in (0.01, 0.2, 10.0)}
    assert len({round(v, 6) for v in losses.values()}) == 3, losses
    with torch.no_grad():  # the ratio by hand: pi / pi_old on the sampled answer tokens only, averaged over turns
        stm, want = model.update_memory(play["stm0"], *play["first"]), 0.0
        for s in play["steps"]:
            logp = token_logprobs(model.decode(s["ids"], stm, attn_mask=s["mask"])[0], s["ids"])[0]
            m = s["ans_mask"][:, :-1]
            want += ((logp - s["old_logp"]).exp() * m).sum().item() / m.sum().item() / len(play["steps"])
            stm = model.update_memory(stm, s["ids"], s["mask"])
    _, metrics = rl.impo_loss(model, critic, play, cfg)
    assert metrics["ratio"] == pytest.approx(want, rel=1e-4) and abs(want - 1) > 1e-3
