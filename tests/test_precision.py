"""The GPU switches, exercised on CPU so that a GPU user never meets the first run of a code path: torch.compile,
bf16 autocast, the fused AdamW kernel (and its fallback)."""

import pytest
import torch

import engine
import training
from model import ModelConfig, ReactiveTransformer, get_config

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_q_heads=2, n_kv_heads=2, enc_ff_dim=32,
                  n_experts=4, top_k=2, expert_dim=32, seq_len=16, stm_size=8)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 64, (4, 16), generator=g)
    return ids, torch.randint(8, 64, (4, 16), generator=g)


def test_compiled_model_gives_the_eager_loss():
    torch.manual_seed(0)
    model = ReactiveTransformer(CFG)
    ids, targets = batch()
    stm = model.new_memory(4, generator=torch.Generator().manual_seed(1))
    eager = model.decode(ids, stm, targets=targets)[1]
    model.compile()
    compiled = model.decode(ids, stm, targets=targets)[1]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not any(k.startswith("_orig_mod") or "._orig_mod." in k for k in model.state_dict())  # clean checkpoints


def test_bf16_autocast_on_cpu_trains_and_stays_close_to_fp32():
    cfg = dict(training.TRAIN_DEFAULTS, device="cpu", dtype="bfloat16", lr=3e-3, max_iters=30, warmup_iters=1)
    device, ctx, _, _ = training.setup(cfg)
    assert isinstance(ctx, torch.autocast)
    torch.manual_seed(0)
    model = ReactiveTransformer(CFG)
    ids, targets = batch()
    stm = model.new_memory(4, generator=torch.Generator().manual_seed(1))
    fp32 = model.decode(ids, stm, targets=targets)[1].item()
    optimizer = training.make_optimizer(model.parameters(), cfg, device)
    losses = []
    for step in range(30):
        with ctx:
            logits, loss, aux = model.decode(ids, stm, targets=targets)
        assert logits.dtype == torch.bfloat16
        losses.append(loss.item())
        training.update(list(model.parameters()), optimizer, loss + 0.01 * aux, step, cfg)
    assert losses[0] == pytest.approx(fp32, rel=0.02)
    assert losses[-1] < 0.7 * losses[0]  # it learns (fp32 from the same start: see the first assertion)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32


def test_adamw_is_fused_where_pytorch_has_the_kernel_and_falls_back_elsewhere(monkeypatch, capsys):
    cfg = dict(training.TRAIN_DEFAULTS)
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    assert training.make_optimizer(params, cfg, torch.device("cpu")).defaults["fused"]
    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    optimizer = training.make_optimizer(params, cfg, torch.device("cpu"))
    assert not optimizer.defaults.get("fused") and "no fused AdamW" in capsys.readouterr().out


def test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype():
    """chat and bench may run under autocast: the single-token path then computes in fp32 (prompt included, so the
    cache has one dtype) and answers exactly as without autocast."""
    torch.manual_seed(0)
    m = ReactiveTransformer(get_config("nano", vocab_size=200)).eval()
    stm, query = m.new_memory(1), torch.randint(0, 200, (8,))
    want = list(engine.interact(m, query, stm, temperature=0, max_new_tokens=6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = list(engine.interact(m, query, stm, temperature=0, max_new_tokens=6))
    assert got == want
