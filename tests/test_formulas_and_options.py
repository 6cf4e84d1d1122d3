"""Formulas with a constant or a gradient in them, checked against values computed by hand; every model option
changes something and an option that is off changes nothing; every setting refuses a wrong type and a negative."""

import importlib
import math
from dataclasses import fields

import pytest
import torch

import cli
import engine
import model as M
import train_mrl
from conftest import TINY
from data.loaders import episode_pools

# -----------------------------------------------------------------------------
# Formulas


def test_rope_tables_follow_the_formula():
    positions, hd, base = torch.tensor([0, 1, 5, 17]), 8, 500.0
    cos, sin = M.rope(positions, hd, base)
    for r, p in enumerate(positions.tolist()):
        for i in range(hd // 2):
            angle = p * base ** (-2 * i / hd)
            assert cos[r, i].item() == pytest.approx(math.cos(angle), abs=1e-5) == cos[r, i + hd // 2].item()
            assert sin[r, i].item() == pytest.approx(-math.sin(angle), abs=1e-5)
            assert sin[r, i + hd // 2].item() == pytest.approx(math.sin(angle), abs=1e-5)


def test_balancing_loss_on_routing_statistics_worked_out_by_hand():
    # 2 experts, 4 tokens, top-1: slots (3, 1), router probability mass (2.5, 1.5)
    stats = torch.tensor([[[3.0, 1.0], [2.5, 1.5]]])
    assert M.balancing_loss(stats).item() == pytest.approx(2 * (0.75 * 0.625 + 0.25 * 0.375))
    # layers are averaged; a second, uniform layer scores 1
    two = torch.cat([stats, torch.tensor([[[2.0, 2.0], [2.0, 2.0]]])])
    assert M.balancing_loss(two).item() == pytest.approx((1.125 + 1.0) / 2)
    # top-2 of 2 experts, 3 tokens: 6 routing slots, but P_e is a mean over the 3 tokens (mass 3 in all)
    top2 = torch.tensor([[[3.0, 3.0], [2.0, 1.0]]])
    assert M.balancing_loss(top2).item() == pytest.approx(2 * (0.5 * 2 / 3 + 0.5 * 1 / 3))


def test_routing_statistics_count_every_slot_and_a_unit_of_probability_per_real_token():
    torch.manual_seed(0)
    moe = M.MoEFeedForward(16, n_experts=4, top_k=2, hidden=8)
    M.init_weights(moe)
    x, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    _, stats = moe(x, mask)
    probs = torch.softmax(moe.router(x[mask]), dim=-1)
    assert torch.equal(stats[0], torch.bincount(probs.topk(2).indices.flatten(), minlength=4).float())
    torch.testing.assert_close(stats[1], probs.sum(dim=0))


def test_the_router_learns_from_the_task_loss_with_the_balancing_loss_off():
    torch.manual_seed(0)
    moe = M.MoEFeedForward(16, n_experts=4, top_k=2, hidden=8)
    M.init_weights(moe)
    y, _ = moe(torch.randn(2, 8, 16))
    y.pow(2).sum().backward()  # through the renormalised top-k weights
    assert moe.router.weight.grad.abs().sum() > 0


def test_competing_slots_share_each_tokens_mass_and_take_a_weighted_mean_of_their_tokens():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)  # 4 query heads, 2 kv heads
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    y = M.competitive_attention(q, k, v, mask)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for b in range(2):
        for h in range(4):
            s = q[b, h] @ kk[b, h].T / 8 ** 0.5  # (slots, tokens)
            a = torch.softmax(s, dim=0) * mask[b, 0, 0]  # each token's mass over the 3 slots; padding takes none
            assert torch.allclose(y[b, h], (a / (a.sum(1, keepdim=True) + 1e-6)) @ vv[b, h], atol=1e-5)
    assert not torch.allclose(y, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                               enable_gqa=True))


def test_temperature_zero_is_greedy_and_a_large_one_is_near_uniform():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert engine.sample_next(logits, 0.0).eq(0).all()
    assert engine.sample_next(logits, 0.1, generator=g).eq(0).float().mean() > 0.99
    share = torch.bincount(engine.sample_next(logits, 1000.0, generator=g), minlength=4).float() / 4000
    assert (share - 0.25).abs().max() < 0.04


def test_answer_lengths_count_the_eos_and_stop_there():
    torch.manual_seed(0)
    m = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **TINY)).eval()
    ids, stm = torch.randint(3, 64, (1, 6)), m.new_memory(1)
    free, _ = engine.generate(m, ids, None, stm, max_new_tokens=8, temperature=0)
    eos = free[0, 2].item()
    first = free[0].tolist().index(eos)
    tokens, lengths = engine.generate(m, ids, None, stm, max_new_tokens=8, temperature=0, eos_id=eos)
    assert lengths.tolist() == [first + 1] and tokens[0, first].item() == eos


# -----------------------------------------------------------------------------
# Options


ALTERNATIVES = dict(vocab_size=80, d_model=48, n_layers=3, n_heads=2, n_q_heads=4, n_kv_heads=1, enc_ff_dim=96,
                    n_experts=6, top_k=1, expert_dim=96, stm_size=8, memory_attention="self-interlayer",
                    gate_type="linear", encoder_cross_attention=True, enc_cross_q_heads=4, enc_cross_kv_heads=1,
                    rope_base=50.0, stm_init_std=0.3, memory_rope=False, memory_qk_norm=True, memory_heads=4,
                    stm_init="learned", ff_bias=True, expert_bias=True, moe_out_bias=True, final_norm="layer",
                    write_competition=True)
NOT_THE_MODELS = {"seq_len"}  # the interaction budget of data and generation; the model has no position table


def outputs(m):
    """Everything a model computes on fixed inputs: a fresh memory, the write, the decoder reading it."""
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 7))
    stm = m.new_memory(2, generator=torch.Generator().manual_seed(2))
    new = m.update_memory(stm, ids)
    return [stm, new, m.decode(ids, new)[0]]


def test_every_model_option_changes_the_parameters_or_the_forward_pass():
    assert set(ALTERNATIVES) | NOT_THE_MODELS == {f.name for f in fields(M.ModelConfig)}
    base_cfg = M.get_config("nano", vocab_size=64, **dict(TINY, memory_attention="interlayer", gate_type="per-slot"))
    torch.manual_seed(0)
    base = M.ReactiveTransformer(base_cfg)
    for name, value in ALTERNATIVES.items():
        extra = {"encoder_cross_attention": True} if name.startswith("enc_cross") else {}
        ref = base
        if extra:  # the cross-attention heads matter only where the encoder reads the memory
            torch.manual_seed(0)
            ref = M.ReactiveTransformer(M.get_config("nano", **dict(base_cfg.__dict__, **extra)))
        torch.manual_seed(0)
        variant = M.ReactiveTransformer(M.get_config("nano", **dict(base_cfg.__dict__, **extra, **{name: value})))
        shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}
        if shapes(variant) != shapes(ref):
            continue
        variant.load_state_dict(ref.state_dict())
        assert any(not torch.allclose(a, b) for a, b in zip(outputs(ref), outputs(variant))), name


def test_the_mini_base_encoder_reads_the_memory_it_writes_into():
    torch.manual_seed(0)
    m = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **dict(TINY, encoder_cross_attention=True)))
    ids = torch.randint(3, 64, (2, 7))
    a, b = (m.new_memory(2, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.allclose(m.encode(ids, None, a), m.encode(ids, None, b))
    plain = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **TINY))
    torch.testing.assert_close(plain.encode(ids, None, a), plain.encode(ids, None, b))


def test_length_buckets_off_draws_the_episodes_in_file_order():
    episodes = [{"distance": 1 + i % 2, "query": "q" * (50 - i), "answer": "a", "interactions": []} for i in range(40)]
    pools = episode_pools(episodes, n_val=4, by_length=False)
    assert pools["train"][1] == [ep for ep in episodes[4:] if ep["distance"] == 1]  # not sorted by length
    cfg = dict(train_mrl.DEFAULTS, batch_size=5, max_iters=10, length_buckets=1)
    got = train_mrl.episode_batch(cfg, pools, "train", 0, [[1, 2]], torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    pool = pools["train"][[1, 2][torch.randint(2, (1,), generator=g).item()]]
    assert got == [pool[i] for i in torch.randint(len(pool), (5,), generator=g).tolist()]


# -----------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("script", ["train_mlm", "train_joint", "train_mrl", "train_baseline", "evaluate", "chat"])
def test_every_numeric_setting_refuses_a_wrong_type_and_a_negative_value(script):
    mod = importlib.import_module(script)
    elsewhere = ["--data_dir=/nonexistent", "--ckpt=/nonexistent.pt", "--init_from=/nonexistent.pt", "--device=cpu"]
    elsewhere = [a for a in elsewhere if a[2:].split("=")[0] in mod.DEFAULTS]
    checked = 0
    for key, value in mod.DEFAULTS.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for bad in ("'many'", "-1"):
            with pytest.raises(cli.ConfigError):
                mod.main([f"--{key}={bad}"] + elsewhere)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("bad", [dict(gate_type="sigmoid"), dict(memory_attention="cross"), dict(stm_init="zeros"),
                                 dict(top_k=5), dict(n_q_heads=3), dict(d_model=100), dict(memory_heads=-1)])
def test_a_model_config_the_code_does_not_implement_is_refused(bad):
    with pytest.raises(ValueError, match="ModelConfig"):
        M.get_config("nano", **bad)


def test_the_curriculum_steps_through_its_entries_over_the_phase():
    episodes = [{"distance": d, "query": "q", "answer": "a", "interactions": []} for d in (1, 2) * 30]
    pools = episode_pools(episodes, n_val=4)
    cfg = dict(train_mrl.DEFAULTS, batch_size=8, max_iters=10, length_buckets=1)
    for step, d in ((0, 1), (4, 1), (5, 2), (9, 2)):
        batch = train_mrl.episode_batch(cfg, pools, "train", step, [[1], [2]], torch.Generator().manual_seed(step))
        assert {ep["distance"] for ep in batch} == {d}, step


def test_smat_detaches_each_writes_input_only_when_asked(monkeypatch):
    """smat_detach_stm=True: turn t's loss trains the write of turn t-1 but not the earlier ones (the write's input
    is detached); False: back-propagation through the whole episode."""
    torch.manual_seed(0)
    model = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **TINY))
    turns = [(torch.randint(3, 64, (2, 6)), torch.ones(2, 6, dtype=torch.bool), torch.randint(3, 64, (2, 6)))
             for _ in range(3)]
    inputs, real = [], model.update_memory
    monkeypatch.setattr(model, "update_memory", lambda stm, *a: inputs.append(stm.requires_grad) or real(stm, *a))
    for detach, want in ((True, [False, False]), (False, [False, True])):  # a fresh noise STM needs no grad
        inputs.clear()
        train_mrl.smat_loss(model, turns, dict(train_mrl.DEFAULTS, smat_detach_stm=detach),
                            torch.Generator().manual_seed(0))
        assert inputs == want, detach


def test_memory_pretraining_pulls_the_write_towards_a_mix_of_the_old_memory_and_the_new_data(monkeypatch):
    torch.manual_seed(0)
    model = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **TINY))
    S = model.cfg.stm_size
    ids, mask = torch.randint(3, 64, (2, S)), torch.ones(2, S, dtype=torch.bool)
    stm0 = model.new_memory(2, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(model, "new_memory", lambda *a, **kw: stm0)
    cfg = dict(train_mrl.DEFAULTS, mem_noise=0.0, mem_jitter=0.0)
    loss, _ = train_mrl.memory_pretrain_loss(model, [(ids, mask, None)], cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ed = model.encode(ids, mask)
        new = model.memory_attention(stm0, ed, mask)
        want = -torch.nn.functional.cosine_similarity(new, 0.1 * stm0 + 0.9 * ed, dim=-1).mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_the_gates_read_the_old_memory_and_the_update_together():
    torch.manual_seed(0)
    stm, update = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    for kind in ("per-slot", "linear", "per-element"):
        gate = M.ResidualGate(kind, 8, 16)
        with torch.no_grad():
            for p in gate.parameters():
                p.normal_()
        m = (stm + update).mean(dim=-1)  # (B, S)
        g = {"per-slot": lambda: torch.sigmoid(gate.w * m + gate.b)[..., None],
             "linear": lambda: torch.sigmoid(gate.lin(m))[..., None],
             "per-element": lambda: torch.sigmoid(gate.lin(stm + update))}[kind]()
        torch.testing.assert_close(gate(stm, update), (1 - g) * stm + g * update)


@pytest.mark.parametrize("gate_type,start", [("linear", 0.5), ("per-element", 0.5), ("per-slot", 0.27),
                                              ("static", 0.27)])
def test_a_fresh_models_gates_start_where_documented(gate_type, start):
    # the fixed gates start small, sigmoid(-1) = 0.27; the content gates at sigmoid(0) = 0.5 (measured better)
    m = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **dict(TINY, gate_type=gate_type)))
    stm, update = (torch.randn(2, m.cfg.stm_size, m.cfg.d_model) * 0.02 for _ in range(2))
    gate = m.memory_attention.layers[0].gate
    with torch.no_grad():
        share = ((gate(stm, update) - stm) / (update - stm)).mean().item()  # g, where old and new differ
    assert abs(share - start) < 0.05, (gate_type, share)


def test_the_critic_reads_the_encoders_last_layer():
    torch.manual_seed(0)
    critic = M.Critic(M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **TINY))).eval()
    ids, mask, stm = torch.randint(3, 64, (2, 6)), torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 2, 16, 32)
    with torch.no_grad():
        before = critic(ids, mask, stm)
        critic.encoder.layers[-1].ff.w_down.weight.mul_(3.0)
        assert not torch.allclose(critic(ids, mask, stm), before)


def test_the_critic_averages_the_query_over_its_real_tokens_only():
    torch.manual_seed(0)
    m = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **TINY))
    critic = M.Critic(m).eval()
    ids = torch.randint(3, 64, (2, 6))
    stm = m.new_memory(2, generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.arange(11)[None] < 6
    with torch.no_grad():
        torch.testing.assert_close(critic(padded, mask.expand(2, -1), stm), critic(ids, torch.ones(2, 6, dtype=torch.bool),
                                                                                stm), atol=1e-5, rtol=1e-5)


def test_every_norm_of_the_encoder_decoder_and_memory_attention_shapes_the_output():
    """Each RMSNorm's gain matters (a sublayer that reads another sublayer's norm leaves its own without effect)."""
    torch.manual_seed(0)
    m = M.ReactiveTransformer(M.get_config("nano", vocab_size=64, **dict(TINY, memory_attention="interlayer")))
    base = outputs(m)
    norms = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.RMSNorm)
             and n.split(".")[0] in ("encoder", "decoder", "memory_attention")]
    assert len(norms) > 10
    for name, norm in norms:
        with torch.no_grad():
            norm.weight.mul_(torch.linspace(0.5, 1.5, norm.weight.numel()))
        assert any(not torch.allclose(a, b) for a, b in zip(base, outputs(m))), name
        with torch.no_grad():
            norm.weight.div_(torch.linspace(0.5, 1.5, norm.weight.numel()))


def test_the_per_slot_gate_reads_what_it_mixes_from_the_start():
    """G = sigmoid(w * mean_D(STM + Update) + b) with w = 1, b = -1 at init: a slot whose STM + Update averages 4
    gets sigmoid(3), one that averages 1 gets sigmoid(0) = 0.5."""
    gate = M.ResidualGate("per-slot", 2, 4)
    stm = torch.tensor([[[1.0] * 4, [0.0] * 4]])  # (1, S=2, D=4)
    update = torch.tensor([[[3.0] * 4, [1.0] * 4]])  # STM + Update averages 4 in slot 0, 1 in slot 1
    with torch.no_grad():
        g = (gate(stm, update) - stm) / (update - stm)  # the share of the update, where old and new differ
    assert g[0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), rel=1e-5)  # 1 * 4 - 1
    assert g[0, 1, 0].item() == pytest.approx(0.5, rel=1e-5)  # 1 * 1 - 1 = 0


def test_self_interlayer_reads_both_its_layer_and_the_layers_mean_through_their_norms():
    torch.manual_seed(0)
    cfg = M.get_config("nano", vocab_size=64, **dict(TINY, memory_attention="self-interlayer"))
    layer = M.MemoryAttentionLayer(cfg).eval()
    contexts = []
    layer.pre_attn.register_forward_hook(lambda mod, args, kwargs, out: contexts.append(args[1]), with_kwargs=True)
    stm, mean, ed = torch.randn(2, cfg.stm_size, cfg.d_model), torch.randn(2, cfg.stm_size, cfg.d_model), \
        torch.randn(2, 5, cfg.d_model)
    with torch.no_grad():
        for own, avg in ((stm, mean), (stm, 100 * mean), (100 * stm, mean), (stm, torch.randn_like(mean)),
                         (torch.randn_like(stm), mean)):
            layer(own, avg, ed, None, None)
    for scaled in contexts[1:3]:  # RMS-normed inputs: the context does not depend on their scale
        torch.testing.assert_close(scaled, contexts[0], rtol=1e-4, atol=1e-4)
    for other in contexts[3:]:  # but it reads both: another mean or another own layer changes it
        assert not torch.allclose(other, contexts[0], atol=1e-3)
