"""Facts about the Reactive Transformer in model.py, checked on tiny configs on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

import engine
import model
from model import Attention, ModelConfig, MoEFeedForward, ReactiveTransformer, StatelessDecoder


def tiny(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_q_heads=2, n_kv_heads=2, enc_ff_dim=48,
                n_experts=4, top_k=2, expert_dim=24, seq_len=32, stm_size=8)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return ReactiveTransformer(tiny(**kw)).eval()


# --- sizes ---------------------------------------------------------------------------------------------------------

def test_micro_parameter_counts_match_the_cards():
    # the micro card: encoder ~2.05M (card ~2.1M), decoder ~9.4M total / ~3.5M active, memory attention ~1.2M,
    # MLM head ~0.98M
    counts = ReactiveTransformer(model.PRESETS["micro"]).param_counts()
    assert counts == {"encoder": 2_043_648, "decoder": 9_412_556, "decoder_active": 3_514_316,
                      "memory_attention": 1_188_864, "mlm_head": 984_268, "total": 12_669_336}


def test_mini_parameter_counts_match_the_cards():
    # the mini card's layout: encoder ~9.1M with its 8q/4kv memory cross-attention (card ~11M), decoder ~58M / ~13.6M active,
    # MLM head ~2.6M
    counts = ReactiveTransformer(model.PRESETS["mini"]).param_counts()
    assert counts == {"encoder": 9_125_888, "decoder": 57_604_112, "decoder_active": 13_563_920,
                      "memory_attention": 2_150_400, "mlm_head": 2_636_304, "total": 68_956_704}


def test_nano_preset_fits_the_cpu_demo_budget():
    cfg = model.PRESETS["nano"]
    assert cfg.d_model <= 96 and cfg.n_layers <= 4 and cfg.vocab_size <= 4096 and cfg.stm_size <= 128
    assert cfg.n_q_heads == cfg.n_kv_heads == cfg.n_heads // 2  # sSQA
    assert ReactiveTransformer(cfg).param_counts()["total"] <= 3_000_000


def test_unknown_config_field_is_an_error():
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model.get_config("nano", d_modle=64)


# --- attention -----------------------------------------------------------------------------------------------------

def naive_attention(attn, x, kv, mask=None):
    """Attention written out with explicit matmuls and repeated kv heads."""
    B, T, _ = x.shape
    hd, Hq, Hkv = attn.hd, attn.n_q, attn.n_kv
    w_q, w_k, w_v = attn.qkv_proj.weight.split([Hq * hd, Hkv * hd, Hkv * hd])  # rows [q | k | v]
    q = (x @ w_q.T).view(B, T, Hq, hd).transpose(1, 2)
    k = (kv @ w_k.T).view(B, -1, Hkv, hd).transpose(1, 2)
    v = (kv @ w_v.T).view(B, -1, Hkv, hd).transpose(1, 2)
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, Hq, T, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, Hq * hd) @ attn.out_proj.weight.T + attn.out_proj.bias


# (H, Hq, Hkv): MHA, GQA, MQA, SQA, sSQA, xSQA
VARIANTS = [(8, 8, 8), (8, 8, 2), (8, 8, 1), (8, 4, 2), (8, 4, 4), (8, 2, 2)]


@pytest.mark.parametrize("H,Hq,Hkv", VARIANTS)
def test_attention_family_matches_naive_attention(H, Hq, Hkv):
    torch.manual_seed(0)
    attn = Attention(64, H, Hq, Hkv)
    x, kv = torch.randn(2, 7, 64), torch.randn(2, 11, 64)
    mask = torch.rand(2, 1, 7, 11) > 0.3
    mask[..., 0] = True
    y = attn(x, kv, attn_mask=mask)
    assert y.shape == (2, 7, 64)
    torch.testing.assert_close(y, naive_attention(attn, x, kv, mask), atol=1e-5, rtol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, is_causal=True), naive_attention(attn, x, x, causal), atol=1e-5, rtol=1e-5)
    # SQA's point: the query (and output) projections shrink with Hq
    assert attn.qkv_proj.weight.shape == ((Hq + 2 * Hkv) * 64 // H, 64) and attn.out_proj.weight.shape == (64, Hq * 64 // H)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = model.apply_rope(q, *model.rope(torch.tensor([m]), 16, 10000.0))
        kn = model.apply_rope(k, *model.rope(torch.tensor([n]), 16, 10000.0))
        return (qm * kn).sum().item()

    assert score(3, 1) == pytest.approx(score(103, 101), abs=1e-4)
    assert score(7, 7) == pytest.approx(score(0, 0), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(1, 3), abs=1e-3)  # but the offset itself matters


# --- encoder and decoder -------------------------------------------------------------------------------------------

def test_decoder_is_causal():
    m = tiny_model()
    stm = m.new_memory(1)
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 97
    a, _, _ = m.decode(ids, stm)
    b, _, _ = m.decode(changed, stm)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_encoder_is_bidirectional():
    m = tiny_model()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 97
    assert not torch.allclose(m.encode(ids)[-1][:, 0], m.encode(changed)[-1][:, 0])


def test_appending_pads_changes_neither_encoder_nor_memory_write():
    m = tiny_model()
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    pmask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
    ed = m.encode(ids, mask)
    ed_p = m.encode(padded, pmask)
    torch.testing.assert_close(ed, ed_p[:, :, :10], atol=1e-5, rtol=1e-5)
    stm = m.new_memory(2)
    torch.testing.assert_close(m.update_memory(stm, ids, mask), m.update_memory(stm, padded, pmask),
                               atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward():
    m = tiny_model()
    stm = m.new_memory(2)
    ids = torch.randint(0, 97, (2, 30))
    full, _, _ = m.decode(ids, stm)
    memory_kv = m.decoder.project_memory(stm)
    caches = [engine.KVCache(30) for _ in m.decoder.layers]
    logits, _ = m.decoder(m.embed(ids[:, :6]), memory_kv, caches=caches)  # prompt
    steps = [logits]
    cos, sin = model.rope(torch.arange(30), m.cfg.head_dim, m.cfg.rope_base)
    for t in range(6, 30):  # then one token per forward
        logits, _ = m.decoder(m.embed(ids[:, t:t + 1]), memory_kv, rope_cs=(cos[t:t + 1], sin[t:t + 1]), caches=caches)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, dict(memory_rope=False), dict(memory_qk_norm=True, memory_heads=4),
                                     dict(memory_rope=False, memory_qk_norm=True, memory_heads=4),  # the demo's
                                     dict(n_q_heads=4, n_kv_heads=2), dict(stateless=True), dict(rows=1),
                                     dict(rows=1, gather=True)])
def test_the_fast_single_token_path_gives_the_full_forward_logits(options):
    """engine.FastStep (one token at a time, weights and RoPE prepared per turn) = Decoder.forward over the sequence,
    with the experts gathered (batches, GPUs) or used in place (one row on a CPU)."""
    stateless, rows, gather = options.pop("stateless", False), options.pop("rows", 2), options.pop("gather", None)
    torch.manual_seed(0)
    m = (StatelessDecoder if stateless else ReactiveTransformer)(tiny(**options)).eval()
    ids = torch.randint(0, 97, (rows, 20))
    memory_kv = None if stateless else m.decoder.project_memory(torch.randn(2, rows, 8, 32))
    full, _ = m.decoder(m.embed(ids), memory_kv)
    caches = [engine.KVCache(20) for _ in m.decoder.layers]
    m.decoder(m.embed(ids[:, :6]), memory_kv, caches=caches)  # the prompt fills the caches
    step = engine.FastStep(m.decoder, memory_kv, caches, start=6, max_new_tokens=14, gather=gather)
    assert step.views == (rows == 1 and not gather)
    with torch.no_grad():
        fast = torch.stack([step(m.embed(ids[:, t]), t) for t in range(6, 20)], dim=1)
    torch.testing.assert_close(fast, full[:, 6:], atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_argmax_of_full_forward_passes():
    """The cached generator (last-position logits of the prompt, then one token per step) picks what a full forward
    over the growing sequence would pick."""
    m = tiny_model()
    stm = m.new_memory(1)
    ids = torch.randint(0, 97, (1, 7))
    got = list(engine.interact(m, ids[0], stm, temperature=0, max_new_tokens=10))
    seq = ids
    for _ in range(10):
        nxt = m.decode(seq, stm)[0][:, -1].argmax(dim=-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert got == seq[0, 7:].tolist()


def test_batched_generation_with_right_padding_matches_one_by_one(monkeypatch):
    """Each row of a right-padded batch gets the tokens - and the logits, position by position - it gets alone."""
    m = tiny_model()
    stm = m.new_memory(2)
    q0, q1 = torch.randint(0, 97, (9,)), torch.randint(0, 97, (5,))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, :5] = q0, q1
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0], mask[1, :5] = True, True
    seen, sample = [], engine.sample_next
    monkeypatch.setattr(engine, "sample_next", lambda logits, *a, **kw: seen.append(logits.clone()) or sample(
        logits, *a, **kw))
    tokens, lengths = engine.generate(m, ids, mask, stm, max_new_tokens=12, temperature=0)
    batched = torch.stack(seen, dim=1)  # (2, 12, V)
    assert tokens.shape == (2, 12) and lengths.tolist() == [12, 12]
    for b, q in enumerate([q0, q1]):
        seen.clear()
        alone = list(engine.interact(m, q, stm[:, b:b + 1], temperature=0, max_new_tokens=12))
        assert tokens[b].tolist() == alone
        torch.testing.assert_close(batched[b], torch.cat(seen), atol=1e-4, rtol=1e-4)


def test_stm_slots_are_a_set():
    m = tiny_model()
    stm = m.new_memory(1) * 50  # large enough to matter
    ids = torch.randint(0, 97, (1, 10))
    perm = torch.randperm(stm.size(2))
    a, _, _ = m.decode(ids, stm)
    b, _, _ = m.decode(ids, stm[:, :, perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c, _, _ = m.decode(ids, m.new_memory(1) * 50)
    assert (a - c).abs().max() > 1e-3  # but the content does matter


def test_stateless_baseline_has_no_memory_path():
    torch.manual_seed(0)
    base = StatelessDecoder(tiny())
    assert all(layer.cross_attn is None for layer in base.decoder.layers)
    ids = torch.randint(0, 97, (1, 10))
    logits, _, _ = base(ids)
    assert logits.shape == (1, 10, 97)
    tokens, lengths = engine.generate(base, ids, max_new_tokens=5, temperature=0)
    assert tokens.shape == (1, 5)


# --- memory --------------------------------------------------------------------------------------------------------

def stm_norm_after_updates(gate_type, n=100):
    m = tiny_model(gate_type=gate_type)
    g = torch.Generator().manual_seed(1)
    stm = m.new_memory(1)
    with torch.no_grad():
        for _ in range(n):
            stm = m.update_memory(stm, torch.randint(0, 97, (1, 16), generator=g))
    return stm.norm(dim=-1).mean().item()


@pytest.mark.parametrize("gate_type", ["static", "per-slot", "per-element", "linear"])
def test_gate_keeps_memory_bounded(gate_type):
    gated, plain = stm_norm_after_updates(gate_type), stm_norm_after_updates("none")
    m = tiny_model()
    update_norm = m.memory_attention.layers[0].attn(torch.randn(1, 8, 32), torch.randn(1, 16, 32)).norm(dim=-1).mean()
    assert plain > 20 * gated  # the plain residual grows turn after turn
    assert gated < 5 * update_norm.item()  # a convex mix stays at the size of one update


def test_memory_update_changes_stm_and_each_variant_runs():
    for variant in ["simple", "self", "interlayer", "self-interlayer"]:
        m = tiny_model(memory_attention=variant)
        stm = m.new_memory(2)
        new = m.update_memory(stm, torch.randint(0, 97, (2, 10)))
        assert new.shape == stm.shape and not torch.allclose(new, stm)


# --- mixture of experts --------------------------------------------------------------------------------------------

def test_moe_matches_naive_per_token_loop():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, n_experts=5, top_k=2, hidden=12)
    model.init_weights(moe)
    nn_init = torch.nn.init
    nn_init.normal_(moe.router.weight, std=1.0)  # decisive routing
    x = torch.randn(3, 7, 16)
    y, _ = moe(x)
    expected = torch.zeros_like(x)
    for b in range(3):
        for t in range(7):
            p = F.softmax(moe.router(x[b, t]), -1)
            w, e = p.topk(2)
            w = w / w.sum()
            for wi, ei in zip(w, e):
                w_gate, w_up = moe.w_gate_up[ei].chunk(2, dim=-1)
                h = F.silu(x[b, t] @ w_gate) * (x[b, t] @ w_up)
                expected[b, t] += wi * (h @ moe.w_down[ei])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_balancing_loss_is_one_when_routing_is_uniform_and_larger_when_not():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, n_experts=4, top_k=1, hidden=8)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8) * 50)  # token with feature e hot goes to expert e
    x = torch.eye(4, 8).repeat(5, 1)[None]  # 20 tokens, 5 per expert: f_e = P_e = 1/4
    aux = model.balancing_loss(moe(x)[1][None])
    assert aux.item() == pytest.approx(1.0, abs=1e-4)
    skewed = model.balancing_loss(moe(torch.eye(4, 8)[:1].repeat(20, 1)[None])[1][None])  # every token to expert 0
    assert skewed.item() > 3.9
    # padding is routed but not counted: 20 uniform tokens + 20 padding tokens of expert 0 are still uniform
    x = torch.cat([x, torch.eye(4, 8)[:1].repeat(20, 1)[None]], dim=1)
    mask = torch.arange(40)[None] < 20
    assert model.balancing_loss(moe(x, mask)[1][None]).item() == pytest.approx(1.0, abs=1e-4)


def test_every_expert_gets_gradients():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, n_experts=6, top_k=2, hidden=8)
    model.init_weights(moe)
    y, routing = moe(torch.randn(4, 32, 16))
    (y.pow(2).sum() + model.balancing_loss(routing[None])).backward()
    for w in (moe.w_gate_up, moe.w_down):
        assert (w.grad.flatten(1).abs().sum(1) > 0).all()
    assert moe.router.weight.grad.abs().sum() > 0


# --- inference -----------------------------------------------------------------------------------------------------

def test_interact_stops_at_eos_or_max_new_tokens():
    m = tiny_model()
    stm = m.new_memory(1)
    query = torch.randint(0, 97, (6,))
    greedy = list(engine.interact(m, query, stm, temperature=0, max_new_tokens=10))
    assert len(greedy) == 10  # no eos_id: runs to max_new_tokens
    assert greedy == list(engine.interact(m, query, stm, temperature=0, max_new_tokens=10))  # greedy is deterministic
    eos = greedy[3]
    stopped = list(engine.interact(m, query, stm, temperature=0, max_new_tokens=10, eos_id=eos))
    assert stopped == greedy[:greedy.index(eos)]  # stops before [EOS], which is not yielded
    with torch.no_grad():
        m.decoder.lm_head.bias[5] = 1e4  # the model now always says token 5
    assert list(engine.interact(m, query, stm, temperature=0.8, top_k=5, top_p=0.9, eos_id=5)) == []


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(engine.sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = F.softmax(logits[0], -1)  # p0 ~ 0.64, p0+p1 ~ 0.88
    assert set(engine.sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(engine.sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert p[0] > 0.5


# --- the memory write, pinned down ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["static", "per-slot", "per-element", "linear"])
def test_gate_zero_keeps_the_memory_and_gate_one_writes_the_update(kind):
    gate = model.ResidualGate(kind, n_slots=8, d_model=32)
    stm, update = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    for value, want in ((-1e4, stm), (1e4, update)):  # sigmoid saturates: G = 0, then G = 1
        with torch.no_grad():
            for p in gate.parameters():
                p.zero_()
            (gate.w if kind == "static" else gate.b if kind == "per-slot" else gate.lin.bias).fill_(value)
        torch.testing.assert_close(gate(stm, update), want)


@pytest.mark.parametrize("kind", ["per-slot", "per-element", "linear"])
def test_a_content_gate_responds_to_what_it_mixes(kind):
    torch.manual_seed(0)
    gate = model.ResidualGate(kind, n_slots=8, d_model=32)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(std=1.0)
    stm, update = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    share = lambda s, u: ((gate(s, u) - s) / (u - s))  # G, recovered from the mix
    assert not torch.allclose(share(stm, update), share(stm, 3 * update + 1), atol=1e-3)


def test_memory_attention_variants_compute_different_writes_from_shared_weights():
    """The variants share the main write; each adds its own STM -> STM step. With the same weights their writes
    differ, and only the inter-layer ones read the other layers' slots."""
    torch.manual_seed(0)
    models = {v: tiny_model(memory_attention=v) for v in ["simple", "self", "interlayer", "self-interlayer"]}
    for v, m in models.items():  # every shared parameter name gets the same values
        m.load_state_dict(models["self-interlayer"].state_dict(), strict=False)
    stm, ids = models["simple"].new_memory(1) * 50, torch.randint(0, 97, (1, 10))
    writes = {v: m.update_memory(stm, ids) for v, m in models.items()}
    names = list(writes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(writes[a], writes[b], atol=1e-4), (a, b)
    other = stm.clone()
    other[1:] = torch.randn_like(other[1:]) * 50  # change every layer but the first
    for v, m in models.items():
        first_layer_changed = not torch.allclose(m.update_memory(other, ids)[0], writes[v][0], atol=1e-5)
        assert first_layer_changed == (v in ("interlayer", "self-interlayer")), v


@pytest.mark.parametrize("memory_rope", [True, False])
def test_the_write_reads_token_order_only_where_the_model_says(memory_rope):
    """Permuting the ED rows changes the write when the write's keys carry positions, and not otherwise (the order
    is then in the encoder's own RoPE); permuting the interaction's tokens changes the write either way."""
    m = tiny_model(memory_rope=memory_rope)
    with torch.no_grad():  # sharp attention: at init (weights ~0.02) the encoder barely sees positions
        for layer in m.encoder.layers:
            layer.attn.qkv_proj.weight.mul_(20)
    stm, ids = m.new_memory(1) * 50, torch.randint(0, 97, (1, 10))
    perm = torch.randperm(10)
    ed = m.encode(ids)
    same = m.memory_attention(stm, ed)
    permuted = m.memory_attention(stm, ed[:, :, perm])
    assert torch.allclose(same, permuted, atol=1e-5) != memory_rope
    assert not torch.allclose(same, m.update_memory(stm, ids[:, perm]), atol=1e-5)


def test_self_attention_sees_token_order():
    """One layer without positions would see the earlier tokens as a bag: its last logits would not change when two
    of them swap. The decoder's and the encoder's RoPE make them change."""
    m = tiny_model(n_layers=1)
    with torch.no_grad():  # sharp attention: at init (weights ~0.02) positions barely show
        m.decoder.layers[0].self_attn.qkv_proj.weight.mul_(20)
        m.encoder.layers[0].attn.qkv_proj.weight.mul_(20)
    stm = m.new_memory(1)
    ids = torch.randint(0, 97, (1, 12))
    swapped = ids.clone()
    swapped[0, [2, 7]] = ids[0, [7, 2]]
    assert not torch.allclose(m.decode(ids, stm)[0][:, -1], m.decode(swapped, stm)[0][:, -1], atol=1e-4)
    assert not torch.allclose(m.encode(ids)[-1, :, -1], m.encode(swapped)[-1, :, -1], atol=1e-4)


def test_decoder_ignores_masked_memory():
    m = tiny_model()
    ids, memory = torch.randint(0, 97, (1, 8)), torch.randn(2, 1, 6, 32)
    mask = torch.tensor([[True, True, True, False, False, False]])
    hidden, _, _ = m.decode(ids, memory, mask)
    torch.testing.assert_close(hidden, m.decode(ids, memory[:, :, :3])[0], atol=1e-5, rtol=1e-5)
    garbage = memory.clone()
    garbage[:, :, 3:] = 1e3
    torch.testing.assert_close(hidden, m.decode(ids, garbage, mask)[0], atol=1e-5, rtol=1e-5)


# --- losses --------------------------------------------------------------------------------------------------------

def test_token_loss_and_accuracy_on_hand_built_logits():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 3] = 10.0  # argmax 2, 1, 3
    targets = torch.tensor([[2, 0, -100]])  # right, wrong, ignored
    want = -(F.log_softmax(logits[0, :2], -1)[[0, 1], [2, 0]]).mean()
    torch.testing.assert_close(model.token_loss(logits, targets), want)
    assert model.token_accuracy(logits, targets).item() == 0.5


def test_token_logprobs_score_each_next_token_and_the_entropy_of_each_prediction():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = logits[0, 1, 1] = 10.0  # position 0 predicts 2, position 1 predicts 1
    logits[0, 2] = 0.0  # the last position predicts nothing
    ids = torch.tensor([[0, 2, 3]])  # what follows position 0 is 2 (predicted), after position 1 it is 3 (not)
    logp, entropy = model.token_logprobs(logits, ids)
    want = F.log_softmax(logits[0, :2], -1)[[0, 1], [2, 3]]
    torch.testing.assert_close(logp[0], want)
    assert logp[0, 0].item() > -1e-6 and logp[0, 1].item() < -10
    assert entropy.shape == (1, 2) and entropy.max().item() < 1e-3  # confident predictions: almost no entropy


def test_mlm_loss_is_the_head_cross_entropy_on_masked_positions_only():
    m = tiny_model()
    ids = torch.randint(8, 97, (2, 10))
    targets = torch.full_like(ids, -100)
    targets[0, 3], targets[1, 7] = ids[0, 3], ids[1, 7]
    masked = ids.masked_fill(targets != -100, 4)
    ed, loss, acc = m.mlm(masked, torch.ones_like(ids, dtype=torch.bool), targets)
    logits = m.mlm_head(m.encode(masked)[-1])
    want = F.cross_entropy(torch.stack([logits[0, 3], logits[1, 7]]), torch.stack([ids[0, 3], ids[1, 7]]))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(ed, m.encode(masked))
    guessed = targets.clone()  # targets the head gets right: accuracy 1 on the masked positions, not 2 of 20
    guessed[0, 3], guessed[1, 7] = logits[0, 3].argmax(), logits[1, 7].argmax()
    assert m.mlm(masked, torch.ones_like(ids, dtype=torch.bool), guessed)[2].item() == 1.0


def test_balancing_loss_gradient_reaches_the_router():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, n_experts=4, top_k=2, hidden=8)
    model.init_weights(moe)
    _, routing = moe(torch.randn(2, 16, 16))
    model.balancing_loss(routing[None]).backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "n_layers", "n_heads", "n_q_heads", "n_kv_heads",
                                   "enc_ff_dim", "n_experts", "top_k", "expert_dim", "seq_len", "stm_size"])
def test_a_size_of_zero_is_refused(field):
    with pytest.raises(ValueError, match=f"{field}.* must be positive"):
        model.get_config("nano", **{field: 0})


@pytest.mark.parametrize("gate_type", ["per-element", "linear"])  # the content gates are Linear layers too
def test_a_fresh_models_linear_biases_start_at_zero(gate_type):
    torch.manual_seed(0)
    m = ReactiveTransformer(model.get_config("nano", gate_type=gate_type))
    biases = [(name, mod.bias) for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)
              and mod.bias is not None]
    assert biases and all(torch.count_nonzero(b) == 0 for _, b in biases), [n for n, b in biases if b.any()]


def test_a_batch_generates_until_every_row_has_said_eos():
    torch.manual_seed(0)
    m = ReactiveTransformer(model.get_config("nano", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_q_heads=2,
                                             n_kv_heads=2, enc_ff_dim=32, expert_dim=32, seq_len=32, stm_size=8)).eval()
    ids, stm = torch.randint(5, 97, (6, 5), generator=torch.Generator().manual_seed(1)), m.new_memory(6)
    free, _ = engine.generate(m, ids, stm=stm, max_new_tokens=6, temperature=0)  # (6, 6), no [EOS]
    # a token row 0 says first and some other row never says: as [EOS], row 0 stops at once and that row goes on
    other = next((b for b in range(1, 6) if free[0, 0] not in free[b]), None)
    assert other is not None, "every row said row 0's first token: pick other prompts"
    tokens, lengths = engine.generate(m, ids, stm=stm, max_new_tokens=6, temperature=0, eos_id=int(free[0, 0]))
    assert lengths[0] == 1 and lengths[other] == 6 and torch.equal(tokens[other], free[other])
