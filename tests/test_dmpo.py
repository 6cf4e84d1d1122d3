"""DMPO, the preference stage: the DPO formula, memory written from accepted turns only, gradients through the whole
memory chain, a frozen reference, pairs from the world, and a tiny world where it raises the preference margin."""

import math
import os
import re
from copy import deepcopy

import pytest
import torch

import rl
import train_mrl
import training
from conftest import TINY
from data.loaders import REJECTED_KINDS, episode_tensors, rejected_answer
from data.memory_world import SLOTS, read_jsonl
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, get_config
from test_mrl import COLOURS, binding_episodes, colour_episodes


def setup(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    return tok, ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))


def batch_of(tok, episodes, mix=None, seed=0, values=SLOTS["colour"]["values"]):
    g = torch.Generator().manual_seed(seed)
    mix = mix or {"binding": 1.0}
    rejected = [rejected_answer(ep, mix, values, g) for ep in episodes]
    return {"episodes": episodes, "turns": episode_tensors(tok, episodes, 64, "cpu"), "rejected": rejected,
            "fallback": [rejected_answer(ep, {"other": 1}, values, g)[1] for ep in episodes]}


def colour_binding(n, seed):
    """Binding episodes with their rivals recorded, as the world records them (the other person's colour)."""
    eps = binding_episodes(n, seed)
    for ep in eps:
        told = dict(s.rstrip(".").split(" likes ") for s in ep["query"].split(". "))
        ep.update(slot="colour", rivals={"binding": next(c for c in told.values() if c != ep["gold"])})
    return eps


def test_dpo_loss_is_the_formula_on_hand_built_log_probabilities_and_log_2_at_the_reference():
    pw, pl, rw, rlo = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), \
        torch.tensor([-2.0, -1.5])
    loss, margin = rl.dpo_loss(pw, pl, rw, rlo, beta=0.5)
    want = [0.5 * ((-1 + 2) - (-3 + 2)), 0.5 * ((-2 + 2) - (-1 + 1.5))]
    assert margin.tolist() == pytest.approx(want)
    assert loss.item() == pytest.approx(sum(-math.log(1 / (1 + math.exp(-m))) for m in want) / 2)
    same, _ = rl.dpo_loss(pw, pl, pw, pl, beta=0.5)
    assert same.item() == pytest.approx(math.log(2))


def test_rejected_answers_come_from_the_kinds_the_mix_asks_for():
    ep = {"gold": "red", "rivals": {"binding": "blue", "overwrite": "green"}}
    g, values = torch.Generator().manual_seed(0), ["red", "blue", "green", "pink"]
    assert rejected_answer(ep, {"binding": 1.0}, values, g) == ("binding", "blue")
    assert rejected_answer(ep, {"overwrite": 1.0}, values, g) == ("overwrite", "green")
    assert rejected_answer(ep, {"own": 1.0}, values, g) == ("own", None)
    kinds = [rejected_answer(ep, {"other": 1.0}, values, g) for _ in range(50)]
    assert {k for k, _ in kinds} == {"other"} and {v for _, v in kinds} == {"blue", "green", "pink"}
    plain = {"gold": "red", "rivals": {}}  # no rival of the asked kind: another value of the slot
    assert rejected_answer(plain, {"binding": 1.0}, values, g)[0] == "other"
    mixed = [rejected_answer(ep, {"binding": 1.0, "overwrite": 3.0}, values, g)[0] for _ in range(400)]
    assert 0.65 < mixed.count("overwrite") / 400 < 0.85 and set(mixed) <= set(REJECTED_KINDS)


def test_the_world_records_each_episodes_rivals():
    from data.memory_world import make_episodes
    eps = make_episodes(300, seed=3)
    for ep in eps:
        assert ep["gold"] not in ep["rivals"].values()
        if ep["binding"] and ep["kind"] != "overwrite":
            assert "binding" in ep["rivals"]
        if "binding" in ep["rivals"]:  # the other person's value, told in turn 1 in a sentence about them
            told = [s for s in ep["query"].split(". ") if re.search(rf"\b{re.escape(ep['rivals']['binding'])}\b", s)]
            assert ep["binding"] and told and all(ep["name"] not in s for s in told)
        if "overwrite" in ep["rivals"]:
            assert ep["kind"] == "overwrite" and ep["rivals"]["overwrite"] != ep["gold"]
    assert sum("binding" in ep["rivals"] for ep in eps) > 30 and sum("overwrite" in ep["rivals"] for ep in eps) > 30


def test_memory_is_written_from_accepted_turns_only_and_the_loss_reaches_the_write(world, monkeypatch):
    tok, model = setup(world)
    reference = deepcopy(model).requires_grad_(False)
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:8]
    batch = batch_of(tok, eps, {"other": 1.0})
    written, real = [], model.update_memory
    monkeypatch.setattr(model, "update_memory", lambda stm, ids, mask=None, chunks=None: written.append(ids) or real(
        stm, ids, mask, chunks))
    cfg = dict(train_mrl.DEFAULTS, seq_len=64)
    loss, metrics = rl.dmpo_loss(model, reference, batch, cfg, tok, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the start
    turns = batch["turns"]
    assert len(written) == len(turns) - 1 and all(torch.equal(w, t[0]) for w, t in zip(written, turns))
    loss.backward()
    for part in (model.memory_attention, model.encoder, model.decoder):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in reference.parameters())


def test_own_wrong_answers_and_the_anchor_join_the_loss(world):
    tok, model = setup(world)
    reference = deepcopy(model).requires_grad_(False)
    eps = colour_binding(6, seed=1)
    batch = batch_of(tok, eps, {"own": 1.0})
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, dmpo_anchor=0.5)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss, metrics = rl.dmpo_loss(model, reference, batch, cfg, tok, torch.Generator().manual_seed(0))
    assert metrics["anchor"] > 0
    plain, _ = rl.dmpo_loss(model, reference, batch, dict(cfg, dmpo_anchor=0.0), tok, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(plain.item() + 0.5 * metrics["anchor"].item(), rel=1e-4)


def test_rejected_answers_are_paired_with_the_probe_question(world, monkeypatch):
    """Accepted and rejected differ in the answer only: both follow the episode's last query, the probe."""
    tok, model = setup(world)
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:6]
    seen, real = [], rl.collate_interactions
    monkeypatch.setattr(rl, "collate_interactions", lambda tok, records, *a: seen.append(records) or real(
        tok, records, *a))
    batch = batch_of(tok, eps, {"other": 1.0})
    rl.dmpo_loss(model, deepcopy(model).requires_grad_(False), batch, dict(train_mrl.DEFAULTS, seq_len=64), tok,
                 torch.Generator().manual_seed(0))
    probes = [rl.episode_turns(ep)[-1]["query"] for ep in eps]
    assert probes[0] != rl.episode_turns(eps[0])[0]["query"]
    assert [r["query"] for r in seen[0]] == probes and [r["answer"] for r in seen[0]] == [t for _, t in batch["rejected"]]


def test_on_policy_rejected_answers_are_generated_for_their_own_episodes_probes(world, monkeypatch):
    """kind "own": the model answers the probe of that episode, from that episode's memory, and its answer becomes
    that episode's rejected answer - not the first episodes' in the batch."""
    tok, model = setup(world)
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:6]
    batch = batch_of(tok, eps, {"other": 1.0})
    batch["rejected"] = [("own", t) if b in (2, 4) else (k, t) for b, (k, t) in enumerate(batch["rejected"])]
    asked, stms, real_q, real_gen = [], [], rl.collate_queries, rl.engine.generate
    monkeypatch.setattr(rl, "collate_queries", lambda tok, queries, *a: asked.append(queries) or real_q(tok, queries, *a))
    monkeypatch.setattr(rl.engine, "generate", lambda m, q, qm, stm, **kw: stms.append(stm) or real_gen(m, q, qm, stm, **kw))
    seen, real = [], rl.collate_interactions
    monkeypatch.setattr(rl, "collate_interactions", lambda tok, records, *a: seen.append(records) or real(
        tok, records, *a))
    rl.dmpo_loss(model, deepcopy(model).requires_grad_(False), batch, dict(train_mrl.DEFAULTS, seq_len=64), tok,
                 torch.Generator().manual_seed(0))
    probes = [rl.episode_turns(ep)[-1]["query"] for ep in eps]
    assert asked == [[probes[2], probes[4]]] and stms[0].size(1) == 2
    assert [r["query"] for r in seen[0]] == probes  # each rejected answer stays beside its own probe
    kept = [t for k, t in batch["rejected"]]
    assert [r["answer"] for r in seen[0]][:2] == kept[:2] and seen[0][3]["answer"] == kept[3]


def test_dmpo_logs_the_mean_margin_and_how_often_the_policy_itself_ranks_the_accepted_answer_first(world, monkeypatch):
    """The logged margin is the batch's mean, so runs of any batch size compare."""
    tok, model = setup(world)
    reference = deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    seen, args, real = [], [], rl.dpo_loss
    monkeypatch.setattr(rl, "dpo_loss", lambda *a: args.append(a) or seen.append(real(*a)) or seen[-1])
    batch = batch_of(tok, colour_binding(6, seed=1), {"binding": 1.0})
    _, metrics = rl.dmpo_loss(model, reference, batch, dict(train_mrl.DEFAULTS, seq_len=64), tok,
                              torch.Generator().manual_seed(0))
    margins = seen[0][1]
    assert margins.shape == (6,) and margins.abs().sum() > 0
    assert metrics["margin"].item() == pytest.approx(margins.mean().item(), rel=1e-6)
    # pref_acc: the share of pairs the policy itself ranks accepted-first, from its log-probabilities alone
    policy_w, policy_l = args[0][:2]
    assert metrics["pref_acc"].item() == pytest.approx((policy_w > policy_l).float().mean().item())


def test_dmpo_raises_the_accepted_over_rejected_margin_on_held_out_episodes_and_keeps_the_reference(world, tmp_path):
    """One fact per episode ("Mia likes red."), the rejected answer another colour of the same list (no prior over
    colours tells them apart: only the memory can). From a briefly SMAT-trained start, a few DMPO steps make the
    policy prefer the told colour on episodes it never saw, by a margin over the frozen reference."""
    tok, model = setup(world)
    cfg, g = dict(train_mrl.DEFAULTS, seq_len=64, dmpo_beta=0.5), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = colour_episodes(400, seed=1)
    for step in range(150):  # SMAT first, as in the curriculum
        batch = [train[i] for i in torch.randint(len(train), (32,), generator=g).tolist()]
        loss, _ = train_mrl.smat_loss(model, episode_tensors(tok, batch, 64, "cpu"), cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    start = tmp_path / "smat.pt"
    training.save_checkpoint(str(start), model, stage="smat", step=0, cfg={}, tokenizer=tok)
    reference = training.init_model(dict(cfg, init_from=str(start)), tok, "cpu").requires_grad_(False)
    held_out = batch_of(tok, colour_episodes(64, seed=99), {"other": 1.0}, values=COLOURS)
    with torch.no_grad():
        before = rl.dmpo_loss(model, reference, held_out, cfg, tok, torch.Generator().manual_seed(0))[1]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for step in range(40):
        batch = batch_of(tok, [train[i] for i in torch.randint(len(train), (16,), generator=g).tolist()],
                         {"other": 1.0}, seed=step, values=COLOURS)
        loss, _ = rl.dmpo_loss(model, reference, batch, cfg, tok, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = rl.dmpo_loss(model, reference, held_out, cfg, tok, torch.Generator().manual_seed(0))[1]
    assert before["margin"].item() == pytest.approx(0.0, abs=1e-5)
    assert after["margin"].item() > 0.3
    # the ranking itself stays near where SMAT left it (~98% here): the margin is not bought by ranking fewer episodes
    # right. Not ">= before": 64 episodes near the ceiling, and another CPU's float order moved 3 of them (CI: 94%)
    assert after["pref_acc"].item() >= 0.9
    start_weights = training.load_checkpoint(str(start))["model"]
    assert all(torch.equal(v, start_weights[k]) for k, v in reference.state_dict().items())


def test_the_dmpo_phase_runs_from_a_checkpoint_and_needs_one(world, tmp_path):
    from conftest import tiny_flags
    import cli
    tok, model = setup(world)
    start = tmp_path / "start.pt"
    training.save_checkpoint(str(start), model, stage="smat", step=0, cfg={}, tokenizer=tok)
    results = train_mrl.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), init_from=str(start), batch_size=4,
                                        phases="dmpo", dmpo_iters=2, eval_interval=100, dmpo_curriculum=[[1, 2]],
                                        dmpo_pairs={"binding": 1.0, "overwrite": 1.0, "other": 1.0, "own": 1.0}))
    assert set(results) == {"dmpo"} and math.isfinite(results["dmpo"]["dpo_loss"])
    assert training.load_checkpoint(str(tmp_path / "dmpo" / "ckpt.pt"))["stage"] == "dmpo"
    with pytest.raises(cli.ConfigError):
        train_mrl.main(tiny_flags(data_dir=world, out_dir=str(tmp_path / "x"), phases="dmpo"))


def test_an_answers_log_probability_is_the_sum_over_its_tokens(world):
    tok, model = setup(world)
    eps = colour_binding(4, seed=2)
    ids, mask, targets = episode_tensors(tok, eps, 64, "cpu")[-1]
    stm = model.new_memory(4, generator=torch.Generator().manual_seed(0))
    logits = model.decode(ids, stm)[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    counted = targets != -100
    want = torch.stack([logp[b][counted[b]].gather(-1, targets[b][counted[b]][:, None]).sum() for b in range(4)])
    torch.testing.assert_close(rl.answer_logprob(model, ids, mask, targets, stm), want, atol=1e-4, rtol=1e-4)


def test_own_rejected_answers_are_the_models_greedy_answers(world, monkeypatch):
    import engine
    tok, model = setup(world)
    eps = colour_binding(3, seed=4)
    wrong = tok.encode("zebra") + [tok.eos_id]
    monkeypatch.setattr(engine, "generate", lambda m, ids, *a, **kw: (torch.tensor([wrong] * ids.size(0)),
                                                                      torch.full((ids.size(0),), len(wrong))))
    seen, real = [], rl.collate_interactions
    monkeypatch.setattr(rl, "collate_interactions", lambda t, records, n: seen.append(records) or real(t, records, n))
    rl.dmpo_loss(model, deepcopy(model), batch_of(tok, eps, {"own": 1.0}), dict(train_mrl.DEFAULTS, seq_len=64), tok,
                 torch.Generator().manual_seed(0))
    assert [r["answer"] for r in seen[0]] == ["zebra"] * 3


def test_dmpo_detaches_each_writes_input_only_when_asked(world, monkeypatch):
    tok, model = setup(world)
    reference = deepcopy(model).requires_grad_(False)
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:4]
    batch = batch_of(tok, eps, {"other": 1.0})
    inputs, real = [], model.update_memory
    monkeypatch.setattr(model, "update_memory", lambda stm, *a: inputs.append(stm.requires_grad) or real(stm, *a))
    for detach in (False, True, None):  # None: the defaults, which keep the whole chain's gradients
        inputs.clear()
        flag = {} if detach is None else {"dmpo_detach_stm": detach}
        rl.dmpo_loss(model, reference, batch, dict(train_mrl.DEFAULTS, seq_len=64, **flag), tok,
                     torch.Generator().manual_seed(0))
        assert inputs == [False] + [not detach] * (len(batch["turns"]) - 2), detach  # the first: a fresh STM


def test_dmpos_fallback_for_a_right_own_answer_is_always_another_value(world, monkeypatch):
    """'own' needs the model's wrong answer; where it is right, the pair falls back to another value, never to
    'own' again (which has no text) - whatever the mix."""
    tok, model = setup(world)
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, dmpo_pairs={"own": 1.0}, init_from="x", dmpo_curriculum=[[1]],
               max_iters=2)
    seen = {}
    monkeypatch.setattr(train_mrl.training, "init_model", lambda *a: model)
    monkeypatch.setattr(train_mrl.training, "train", lambda cfg, model, **kw: seen.update(kw) or {})
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 1]
    train_mrl.train_dmpo(cfg, model, tok, {"train": {1: eps}}, torch.device("cpu"), None, 0, 1)
    batch = seen["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    assert {kind for kind, _ in batch["rejected"]} == {"own"}
    for ep, text in zip(batch["episodes"], batch["fallback"]):
        assert text in SLOTS[ep["slot"]]["values"] and text != ep["gold"]
