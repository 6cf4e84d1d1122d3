"""Contracts of model.py that the other test files leave open: each config check's own message, the presets' layouts,
QK-norm before RoPE, the bf16 expert path with biases, the Mini-Base encoder's per-layer memory read, the write's
per-layer inputs, the fresh model's initialisation, new_memory's options, the critic's inputs, the edge cases of the
losses (nothing counted), and the small methods (keep_logits, compile, param_counts with biases)."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from conftest import TINY


def tiny_cfg(**kw):
    return M.get_config("nano", vocab_size=64, **dict(TINY, **kw))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return M.ReactiveTransformer(tiny_cfg(**kw)).eval()


# -----------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("bad,message", [
    (dict(d_model=48, n_heads=5), "d_model must be divisible by n_heads"),
    (dict(d_model=24, n_heads=8), "RoPE needs an even head size"),
    (dict(n_q_heads=3, n_kv_heads=2), "n_q_heads must be a multiple of n_kv_heads"),
    (dict(n_experts=4, top_k=5), "top_k must be at most n_experts"),
    (dict(memory_attention="cross"), "memory_attention: one of"),
    (dict(gate_type="sigmoid"), "gate_type must be one of"),
    (dict(stm_init="zeros"), "stm_init must be noise or learned"),
    (dict(final_norm="layernorm"), "final_norm must be rms, none or layer"),
    (dict(d_model=36, n_heads=2, n_q_heads=2, n_kv_heads=2), "multiples of 8"),
    (dict(expert_dim=100), "multiples of 8"),
    (dict(memory_heads=-1), "^ModelConfig: memory_heads must be positive$"),
    (dict(vocab_size=0, stm_size=0), "^ModelConfig: vocab_size, stm_size must be positive$"),
])
def test_each_unimplemented_config_is_refused_with_its_own_reason(bad, message):
    # each check is the only one that fails for its config, so its message is the one raised
    with pytest.raises(ValueError, match=message):
        M.get_config("nano", **bad)


def test_the_edges_of_the_config_checks_are_accepted():
    for ok in (dict(top_k=4, n_experts=4), dict(memory_heads=0), dict(final_norm="rms"), dict(final_norm="none"),
               dict(final_norm="layer"), dict(n_q_heads=4, n_kv_heads=1), dict(d_model=40, n_heads=4)):
        cfg = M.get_config("nano", **ok)
        assert all(getattr(cfg, k) == v for k, v in ok.items())
    assert M.ModelConfig(d_model=64, n_heads=8, n_q_heads=2, n_kv_heads=2).head_dim == 8  # D / H, not D / Hq


def test_get_config_refuses_an_unknown_preset_and_leaves_the_presets_untouched():
    with pytest.raises(ValueError, match="unknown model preset 'tiny'; choose one of"):
        M.get_config("tiny")
    cfg = M.get_config("nano", d_model=64)
    assert cfg.d_model == 64 and M.PRESETS["nano"].d_model == 96
    # the demo's layout (README) and the Mini card's: these fields set what the presets are
    nano, micro, mini = (M.get_config(p) for p in ("nano", "micro", "mini"))
    assert (nano.memory_attention, nano.gate_type, nano.encoder_cross_attention) == ("interlayer", "per-slot", False)
    assert (micro.memory_attention, micro.gate_type) == ("self-interlayer", "linear")
    assert (mini.gate_type, mini.encoder_cross_attention) == ("per-slot", True)


# -----------------------------------------------------------------------------
# Attention


def test_qk_norm_is_applied_before_rope_and_to_both_queries_and_keys():
    """With learned gains that are not all 1, norm-then-rotate and rotate-then-norm differ: the gains belong to the
    head's unrotated dimensions."""
    torch.manual_seed(0)
    attn = M.Attention(32, 4, 2, 2, qk_norm=True)
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.2, 3.0, 8))
        attn.k_norm.weight.copy_(torch.linspace(3.0, 0.5, 8))
    x, ctx = torch.randn(1, 5, 32), torch.randn(1, 6, 32)
    cs_q, cs_k = M.rope(torch.arange(5), 8, 10000.0), M.rope(torch.arange(6), 8, 10000.0)
    y = attn(x, ctx, q_rope=cs_q, k_rope=cs_k)
    w_q, w_k, w_v = attn.qkv_proj.weight.split([16, 16, 16])
    q = M.apply_rope(attn.q_norm((x @ w_q.T).view(1, 5, 2, 8).transpose(1, 2)), *cs_q)
    k = M.apply_rope(attn.k_norm((ctx @ w_k.T).view(1, 6, 2, 8).transpose(1, 2)), *cs_k)
    v = (ctx @ w_v.T).view(1, 6, 2, 8).transpose(1, 2)
    want = ((q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 16)
    torch.testing.assert_close(y, attn.out_proj(want), atol=1e-5, rtol=1e-5)


def test_memory_heads_default_to_the_models_query_and_key_value_heads():
    cfg = tiny_cfg(n_q_heads=4, n_kv_heads=2)
    attn = M.memory_attention_heads(cfg)
    assert (attn.n_q, attn.n_kv) == (4, 2)
    attn = M.memory_attention_heads(tiny_cfg(n_q_heads=4, n_kv_heads=2, memory_heads=1))
    assert (attn.n_q, attn.n_kv) == (1, 1)


# -----------------------------------------------------------------------------
# Feed-forward


def test_the_bf16_expert_path_with_biases_gives_the_fp32_output():
    """Under bf16 autocast the experts run as one grouped matmul (offsets = where each expert's group ends), each
    routing slot getting its own expert's biases; it must compute what the fp32 loop computes."""
    torch.manual_seed(0)
    moe = M.MoEFeedForward(16, n_experts=4, top_k=2, hidden=16, expert_bias=True, out_bias=True)
    M.init_weights(moe)
    with torch.no_grad():
        for p in (moe.b_gate_up, moe.b_down, moe.out_bias):
            p.normal_()
        moe.router.weight.normal_()  # decisive, uneven routing: groups of different sizes
        moe.w_gate_up.normal_(std=0.3)
        moe.w_down.normal_(std=0.3)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        want, stats = moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = moe(x)
    assert len(set(stats[0].tolist())) > 1  # the experts' groups differ in size
    torch.testing.assert_close(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.05)


def test_balancing_loss_of_no_real_tokens_is_zero_not_nan():
    assert M.balancing_loss(torch.zeros(2, 2, 4)).item() == 0.0


def test_the_encoders_feed_forward_has_biases_exactly_when_asked():
    plain, biased = tiny_model(), tiny_model(ff_bias=True)
    c = plain.cfg
    assert all(layer.ff.w_gate_up.bias is None and layer.ff.w_down.bias is None for layer in plain.encoder.layers)
    assert biased.param_counts()["encoder"] - plain.param_counts()["encoder"] == c.n_layers * (2 * c.enc_ff_dim + c.d_model)


def test_active_decoder_parameters_leave_out_the_unused_experts_with_their_biases():
    m = tiny_model(expert_bias=True)
    moe, c = m.decoder.layers[0].moe, m.cfg
    one_expert = sum(p[0].numel() for p in (moe.w_gate_up, moe.w_down, moe.b_gate_up, moe.b_down))
    counts = m.param_counts()
    assert counts["decoder"] - counts["decoder_active"] == c.n_layers * (c.n_experts - c.top_k) * one_expert
    assert counts["total"] == sum(p.numel() for p in m.parameters())


# -----------------------------------------------------------------------------
# Encoder, decoder, heads


def test_the_mini_base_encoder_layer_l_reads_memory_layer_l_through_its_norm():
    m = tiny_model(encoder_cross_attention=True)
    ids = torch.randint(3, 64, (2, 7))
    stm = m.new_memory(2, generator=torch.Generator().manual_seed(1)) * 10
    with torch.no_grad():
        ed = m.encode(ids, None, stm)
        other_last = stm.clone()
        other_last[-1] = torch.randn_like(stm[-1]) * 10
        ed_last = m.encode(ids, None, other_last)
        # a new last memory layer changes only the last encoder layer
        torch.testing.assert_close(ed_last[:-1], ed[:-1])
        assert not torch.allclose(ed_last[-1], ed[-1], atol=1e-4)
        other_first = stm.clone()
        other_first[0] = torch.randn_like(stm[0]) * 10
        assert not torch.allclose(m.encode(ids, None, other_first)[0], ed[0], atol=1e-4)
        # the memory is RMS-normed before it is read: its scale does not matter
        torch.testing.assert_close(m.encode(ids, None, stm * 7), ed, atol=1e-4, rtol=1e-4)
        # without a memory (the MLM stage) the cross-attention is skipped, not an error
        alone = m.encode(ids)
        for layer in m.encoder.layers:
            layer.cross_attn = None
        torch.testing.assert_close(alone, m.encode(ids))


def test_the_mini_base_encoders_memory_read_rotates_its_queries():
    """Self-attention silenced, a sequence of one repeated token differs from position to position only through the
    rotated queries of the cross-attention (the memory's keys carry no position)."""
    m = tiny_model(encoder_cross_attention=True, n_layers=1)
    layer = m.encoder.layers[0]
    with torch.no_grad():
        layer.attn.out_proj.weight.zero_()
        layer.cross_attn.qkv_proj.weight.mul_(30)  # sharp enough for the positions to show
        stm = m.new_memory(1, std=1.0)
        ed = m.encode(torch.full((1, 6), 5), None, stm)[0, 0]  # (T, D)
    assert (ed - ed[0]).abs().max() > 1e-3


def test_a_multi_token_step_on_a_filled_cache_is_refused():
    import engine
    m = tiny_model()
    caches = [engine.KVCache(16) for _ in m.decoder.layers]
    kv = m.decoder.project_memory(m.new_memory(1))
    with torch.no_grad():
        m.decoder(m.embed(torch.randint(3, 64, (1, 4))), kv, caches=caches)
        with pytest.raises(AssertionError, match="multi-token step on a filled cache"):
            m.decoder(m.embed(torch.randint(3, 64, (1, 3))), kv, caches=caches)


def test_logits_at_picks_each_rows_own_position():
    m = tiny_model()
    ids, kv = torch.randint(3, 64, (2, 6)), m.decoder.project_memory(m.new_memory(2))
    with torch.no_grad():
        full, _ = m.decoder(m.embed(ids), kv)
        one, _ = m.decoder(m.embed(ids[:1]), [tuple(t[:1] for t in k) for k in kv], logits_at=torch.tensor([2]))
        two, _ = m.decoder(m.embed(ids), kv, logits_at=torch.tensor([4, 1]))
    torch.testing.assert_close(one, full[:1, 2:3])
    torch.testing.assert_close(two, full[[0, 1], [4, 1]][:, None])


def test_losses_and_routing_statistics_are_computed_in_fp32_under_bf16_autocast():
    m = tiny_model()
    ids, stm = torch.randint(3, 64, (2, 8)), m.new_memory(2)
    targets = ids.roll(-1, dims=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss, _ = m.decode(ids, stm, targets=targets)
        _, stats = m.decoder.layers[0].moe(torch.randn(1, 300, 32))
        token = M.token_loss(logits, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == token.dtype == torch.float32
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(token, want, atol=1e-6, rtol=1e-6)
    # bf16 logits outside autocast too (a model cast to bf16): the loss is still taken in fp32
    assert M.token_loss(logits, targets).dtype == torch.float32
    # a unit of router probability per token, summed in fp32: 300 tokens weigh 300
    assert stats.dtype == torch.float32 and abs(stats[1].sum().item() - 300) < 1e-3


@pytest.mark.parametrize("kind,norm", [("rms", torch.nn.RMSNorm), ("layer", torch.nn.LayerNorm),
                                       ("none", torch.nn.Identity)])
def test_the_final_norm_is_the_one_the_config_names(kind, norm):
    assert type(tiny_model(final_norm=kind).decoder.norm) is norm


def test_token_logprobs_entropy_is_log_v_for_a_uniform_prediction():
    logits = torch.zeros(2, 4, 10)
    logits[:, 1, 3] = 1e4  # one confident prediction
    logp, entropy = M.token_logprobs(logits, torch.tensor([[0, 1, 3, 2]] * 2))
    torch.testing.assert_close(entropy[:, [0, 2]], torch.full((2, 2), math.log(10)))
    assert entropy[:, 1].abs().max() < 1e-4 and logp[:, 1].abs().max() < 1e-4
    torch.testing.assert_close(logp[:, [0, 2]], torch.full((2, 2), -math.log(10)))


def test_the_mlm_head_is_linear_gelu_layernorm_linear():
    torch.manual_seed(0)
    head = M.MLMHead(tiny_cfg())
    h = torch.randn(3, 32)
    want = head.out(F.layer_norm(F.gelu(h @ head.dense.weight.T + head.dense.bias), (32,), head.norm.weight,
                                 head.norm.bias))
    torch.testing.assert_close(head(h), want)


def test_the_critic_owns_a_copy_of_the_encoder_and_reads_each_rows_memory():
    m = tiny_model()
    critic = M.Critic(m).eval()
    assert not {id(p) for p in critic.parameters()} & {id(p) for p in m.parameters()}  # trains apart from the model
    torch.testing.assert_close(critic.encoder(critic.embed(torch.tensor([[5, 6]]))), m.encode(torch.tensor([[5, 6]])))
    ids, mask = torch.randint(3, 64, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    stm = m.new_memory(2, generator=torch.Generator().manual_seed(1), std=1.0)
    with torch.no_grad():
        v = critic(ids, mask, stm)
        assert v.shape == (2,)
        # the memory enters as its mean over layers and slots, per row
        torch.testing.assert_close(critic(ids, mask, stm[:, :, torch.randperm(stm.size(2))]), v)
        other = stm.clone()
        other[0, 1] += torch.randn_like(other[0, 1])  # row 1's first layer only
        got = critic(ids, mask, other)
        assert got[0] == v[0] and not torch.allclose(got[1], v[1], atol=1e-5)
        # the value: Linear -> GELU -> Linear of [the mean of the query's last layer | the memory's mean]
        pooled = torch.cat([critic.encoder(critic.embed(ids))[-1].mean(dim=1), stm.mean(dim=(0, 2))], dim=-1)
        lin1, _, lin2 = critic.head
        torch.testing.assert_close(v, lin2(F.gelu(lin1(pooled)))[:, 0], atol=1e-6, rtol=1e-5)
        assert critic(ids[:1], mask[:1], stm[:, :1]).shape == (1,)  # one row is still a batch


# -----------------------------------------------------------------------------
# Memory attention


def pre_attention_inputs(variant, stm_l, stm_mean, mix=None):
    torch.manual_seed(0)
    layer = M.MemoryAttentionLayer(tiny_cfg(memory_attention=variant)).eval()
    if mix is not None:
        with torch.no_grad():
            layer.mix.copy_(mix)
    seen = []
    layer.pre_attn.register_forward_hook(lambda mod, args, out: seen.append(args))
    with torch.no_grad():
        layer(stm_l, stm_mean, torch.randn(2, 5, 32), None, None)
    return seen[0]


def rms_normed(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def test_the_stm_to_stm_step_reads_normed_slots_of_the_variants_context():
    torch.manual_seed(1)
    own, mean = torch.randn(2, 16, 32) * 5, torch.randn(2, 16, 32) * 3
    for variant, context in (("self", own), ("interlayer", mean)):
        q, kv = pre_attention_inputs(variant, own, mean)
        torch.testing.assert_close(q, rms_normed(own), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv, rms_normed(context), atol=1e-5, rtol=1e-5)
    # self-interlayer: sigmoid(mix) of the own layer, the rest of the mean - per slot, 0.5 each at init
    q, kv = pre_attention_inputs("self-interlayer", own, mean)
    torch.testing.assert_close(kv, 0.5 * rms_normed(own) + 0.5 * rms_normed(mean), atol=1e-5, rtol=1e-5)
    mix = torch.linspace(-3, 3, 16)[:, None]
    q, kv = pre_attention_inputs("self-interlayer", own, mean, mix)
    s = torch.sigmoid(mix)
    torch.testing.assert_close(kv, s * rms_normed(own) + (1 - s) * rms_normed(mean), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate_type", ["static", "linear"])
def test_the_stm_to_stm_step_is_gated_like_the_write(gate_type):
    layer = M.MemoryAttentionLayer(tiny_cfg(memory_attention="self", gate_type=gate_type))
    assert layer.pre_gate.kind == layer.gate.kind == gate_type


def test_each_memory_layer_is_written_from_its_own_encoder_layer():
    m = tiny_model(memory_attention="simple")
    stm, ed = m.new_memory(2, std=1.0), torch.randn(2, 2, 7, 32)
    with torch.no_grad():
        new = m.memory_attention(stm, ed)
        other = ed.clone()
        other[1] = torch.randn_like(ed[1])
        changed = m.memory_attention(stm, other)
    torch.testing.assert_close(changed[0], new[0])
    assert not torch.allclose(changed[1], new[1], atol=1e-5)


# -----------------------------------------------------------------------------
# The Reactive Transformer


def test_a_fresh_model_draws_its_weights_at_std_0_02_and_its_norms_at_one():
    m = tiny_model()
    for name, w in (("embed", m.embed.weight), ("lm_head", m.decoder.lm_head.weight),
                    ("experts", m.decoder.layers[0].moe.w_gate_up), ("experts_down", m.decoder.layers[0].moe.w_down),
                    ("router", m.decoder.layers[0].moe.router.weight)):
        assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.003, name
    assert torch.equal(m.decoder.norm.weight, torch.ones(32))


@pytest.mark.parametrize("stm_init", ["noise", "learned"])
def test_new_memory_is_noise_of_the_asked_std_around_the_learned_slots(stm_init):
    m = tiny_model(stm_init=stm_init, stm_init_std=0.5)
    c = m.cfg
    base = torch.zeros(c.n_layers, 1, c.stm_size, c.d_model) if stm_init == "noise" else m.stm_init[:, None]
    with torch.no_grad():
        assert m.new_memory(3).shape == (c.n_layers, 3, c.stm_size, c.d_model)
        torch.testing.assert_close(m.new_memory(3, std=0.0), base.expand(-1, 3, -1, -1))
        noise = m.new_memory(4) - base
        assert abs(noise.std().item() - 0.5) < 0.03  # the config's stm_init_std by default
        assert abs((m.new_memory(4, std=2.0) - base).std().item() - 2.0) < 0.12
        g = lambda: torch.Generator().manual_seed(5)
        torch.testing.assert_close(m.new_memory(2, generator=g()), m.new_memory(2, generator=g()))
    if stm_init == "learned":  # slots start distinct (a learned identity each), small
        assert m.stm_init.std().item() == pytest.approx(0.02, abs=0.003)
        assert any(p is m.stm_init for p in m.parameters())
        m.new_memory(2).sum().backward()  # the fresh memory trains the slots
        assert m.stm_init.grad.abs().min() > 0


def test_decode_returns_logits_without_chunks_even_when_not_kept_and_none_with_chunks():
    m = tiny_model()
    ids, stm = torch.randint(3, 64, (2, 6)), m.new_memory(2)
    with torch.no_grad():
        full, loss, aux = m.decode(ids, stm)
        assert loss is None and aux.dim() == 0
        torch.testing.assert_close(m.decode(ids, stm, keep_logits=False)[0], full)
        chunks = [(torch.tensor([1]), 6), (torch.tensor([0]), 6)]
        assert m.decode(ids, stm, chunks=chunks, keep_logits=False)[0] is None
        torch.testing.assert_close(m.decode(ids, stm, chunks=chunks)[0], full, atol=1e-5, rtol=1e-5)


def test_losses_with_nothing_to_count_are_zero_not_nan():
    m = tiny_model()
    ids, stm = torch.randint(3, 64, (2, 6)), m.new_memory(2)
    nothing = torch.full_like(ids, -100)
    with torch.no_grad():
        assert m.decode(ids, stm, targets=nothing)[1].item() == 0.0
        _, ce, acc = m.mlm(ids, torch.ones_like(ids, dtype=torch.bool), nothing)
    assert ce.item() == 0.0 and acc.item() == 0.0


def test_mlm_in_chunks_sums_the_loss_and_accuracy_of_every_chunk():
    m = tiny_model()
    ids, mask = torch.randint(8, 64, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
    targets = torch.full_like(ids, -100)
    targets[:, 2] = ids[:, 2]
    masked = ids.masked_fill(targets != -100, 4)
    with torch.no_grad():
        _, ce, _ = m.mlm(masked, mask, targets)
        head = m.mlm_head(m.encode(masked, mask)[-1][:, 2]).argmax(-1)
        guessed = targets.clone()
        guessed[:2, 2] = head[:2]  # rows 0 and 1 right, row 2 (its own chunk) most likely wrong
        guessed[2, 2] = (head[2] + 1) % 64
        chunks = [(torch.tensor([0, 1]), 8), (torch.tensor([2]), 8)]
        _, ce_c, _ = m.mlm(masked, mask, targets, chunks)
        _, _, acc = m.mlm(masked, mask, guessed, chunks)
    torch.testing.assert_close(ce_c, ce, atol=1e-5, rtol=1e-5)
    assert acc.item() == pytest.approx(2 / 3)


def test_compile_compiles_the_three_parts_training_calls_with_the_given_options(monkeypatch):
    m, calls = tiny_model(), []
    for name in ("encoder", "decoder", "memory_attention", "mlm_head"):
        part = getattr(m, name)
        monkeypatch.setattr(part, "compile", lambda name=name, **kw: calls.append((name, kw)))
    m.compile(mode="reduce-overhead")
    assert calls == [(n, {"mode": "reduce-overhead"}) for n in ("encoder", "decoder", "memory_attention")]
    base, calls = M.StatelessDecoder(tiny_cfg()), []
    monkeypatch.setattr(base.decoder, "compile", lambda **kw: calls.append(kw))
    base.compile(dynamic=True)
    assert calls == [{"dynamic": True}]


def test_the_stateless_baseline_returns_the_token_loss_and_the_balancing_loss():
    torch.manual_seed(0)
    base = M.StatelessDecoder(tiny_cfg()).eval()
    ids = torch.randint(3, 64, (2, 6))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    with torch.no_grad():
        logits, loss, aux = base(ids, targets)
        _, routing = base.decoder(base.embed(ids))
        assert base(ids)[1] is None
    torch.testing.assert_close(loss, M.token_loss(logits, targets))
    assert aux.dim() == 0 and aux.item() == pytest.approx(M.balancing_loss(routing).item())
    assert base.decoder.project_memory(None) == [None] * base.cfg.n_layers
