"""The shared training plumbing: configuration, schedule, checkpoints."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import cli
import training
from model import ModelConfig, ReactiveTransformer, StatelessDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_files_and_flags_override_in_order(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("_warm = 10  # a config file's own helper name: not a setting\nlr = 3e-4\nbatch_size = 8\n"
                 "warmup_iters = _warm * 2\n")
    cfg = cli.configure(training.TRAIN_DEFAULTS, [str(f), "--batch_size=4", "--out_dir=out/x", "--lr=1"])
    assert cfg["batch_size"] == 4 and cfg["out_dir"] == "out/x" and cfg["lr"] == 1.0 and cfg["warmup_iters"] == 20
    assert "_warm" not in cfg


@pytest.mark.parametrize("argv,message", [
    (["--batch_sise=4"], "unknown config key 'batch_sise'"),
    (["--batch_size=abc"], "must be int"),
    (["--batch_size=True"], "must be int, got bool"),  # a bool is an int to isinstance, never a batch size
    (["--lr=True"], "must be float, got bool"),
    (["--lr"], "expected --key=value"),
    (["config/does_not_exist.py"], "config file not found"),
])
def test_config_errors_are_clear(argv, message):
    with pytest.raises(cli.ConfigError, match=message):
        cli.configure(training.TRAIN_DEFAULTS, argv)


def test_bad_flag_exits_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train_joint.py", f"--out_dir={out}", "--max_iter=5"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown config key 'max_iter'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_a_run_is_evaluated_at_its_end_whatever_the_interval(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(training, "evaluate", lambda *a: seen.append(a[-1]) or {"val_loss": 0.0})
    torch.manual_seed(0)
    model = ReactiveTransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_q_heads=2, n_kv_heads=2,
                                            enc_ff_dim=32, n_experts=2, top_k=1, expert_dim=32, seq_len=16, stm_size=4))
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), device="cpu", max_iters=3, eval_interval=100,
               warmup_iters=1, log_interval=1000)
    metrics = training.train(cfg, model, stage="test", get_batch=lambda split, step, g: None,
                             loss_fn=lambda model, batch, step, g: (model.embed.weight.pow(2).sum(), {}),
                             params=list(model.parameters()), device=torch.device("cpu"), ctx=contextlib.nullcontext())
    assert seen == [2] and metrics["val_loss"] == 0.0  # the last step (0-based), though 3 < eval_interval


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lrs = [training.lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising through warmup
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)  # the peak is lr, never above it
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rising again
    assert training.lr_at(100, cfg) == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-6)  # cosine midpoint


def tiny_cfg(**kw):
    return ModelConfig(**dict(dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_q_heads=1, n_kv_heads=1,
                                   enc_ff_dim=16, n_experts=2, top_k=1, expert_dim=8, seq_len=16, stm_size=4), **kw))


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = ReactiveTransformer(tiny_cfg())
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, m, stage="joint", step=7, cfg={"a": 1}, metrics={"loss": 1.5})
    ckpt = training.load_checkpoint(path)
    m2 = training.model_from_checkpoint(ckpt, path)
    assert ckpt["stage"] == "joint" and ckpt["step"] == 7 and ckpt["metrics"] == {"loss": 1.5}
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert not os.path.exists(path + ".tmp")


def test_missing_corrupt_and_wrong_shape_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(cli.CheckpointError, match="not found"):
        training.load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(cli.CheckpointError, match="cannot read"):
        training.load_checkpoint(str(bad))
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, ReactiveTransformer(tiny_cfg()), stage="joint", step=1, cfg={})
    other = ReactiveTransformer(tiny_cfg(d_model=32))
    with pytest.raises(cli.CheckpointError, match="does not fit") as e:
        training.load_weights(other, training.load_checkpoint(path)["model"], path)
    assert "\n" not in str(e.value)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = ReactiveTransformer(tiny_cfg())
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, m, stage="joint", step=1, cfg={})
    real_save = torch.save

    def crash(obj, f, *a, **kw):  # half a file, then the machine goes down
        real_save({"partial": torch.zeros(3)}, f, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(path, m, stage="joint", step=2, cfg={})
    assert training.load_checkpoint(path)["step"] == 1


def test_data_parallel_gradients_are_the_mean_over_ranks(monkeypatch):
    """With two ranks whose gradients are equal, the all-reduce sums them; update() must divide by the world size,
    so that the step is the one a single process takes (AdamW alone would hide a doubled gradient: check the grads)."""
    grads = {}
    for world in (1, 2):
        torch.manual_seed(0)
        m = ReactiveTransformer(tiny_cfg())
        params = list(m.parameters())
        cfg = dict(training.TRAIN_DEFAULTS, grad_clip=1e9)
        opt = training.make_optimizer(params, cfg, torch.device("cpu"))
        monkeypatch.setattr(training.dist, "all_reduce", lambda t: t.mul_(world))  # world equal ranks, summed
        loss = m.decode(torch.randint(3, 50, (2, 6)), m.new_memory(2, generator=torch.Generator().manual_seed(1)))[0]
        training.update(params, opt, loss.pow(2).mean(), 0, cfg, world=world)
        grads[world] = [p.grad.clone() for p in params if p.grad is not None]
    assert all(torch.allclose(a, b) for a, b in zip(grads[1], grads[2])) and grads[1]


def test_the_optimizer_trains_every_parameter_and_decays_only_matrices():
    torch.manual_seed(0)
    m = ReactiveTransformer(tiny_cfg(gate_type="per-slot"))
    opt = training.make_optimizer(m.parameters(), dict(training.TRAIN_DEFAULTS), torch.device("cpu"))
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set().union(*groups.values()) == {id(p) for p in m.parameters()}  # norms, biases and gates too
    assert groups[0.0] == {id(p) for p in m.parameters() if p.dim() < 2}


def test_a_stage_resumes_only_from_its_own_checkpoint(tmp_path):
    """out_dir/ckpt.pt of another stage (e.g. the joint checkpoint where SFT writes) is not a run to resume."""
    torch.manual_seed(0)
    other, m = ReactiveTransformer(tiny_cfg()), ReactiveTransformer(tiny_cfg())
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, other, stage="joint", step=7, cfg={}, metrics={"loss": 1.5})
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), resume=True, compile=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _, step, metrics = training.start(cfg, m, list(m.parameters()), stage="sft", device="cpu")
    assert step == 0 and metrics == {} and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    _, step, metrics = training.start(cfg, m, list(m.parameters()), stage="joint", device="cpu")
    assert step == 7 and metrics == {"loss": 1.5}  # its own stage's checkpoint does resume
    _, step, metrics = training.start(dict(cfg, resume=False), m, list(m.parameters()), stage="joint", device="cpu")
    assert step == 0 and metrics == {}  # resume=False starts over, whatever out_dir holds


def test_every_parameter_group_follows_the_schedule():
    torch.manual_seed(0)
    m = ReactiveTransformer(tiny_cfg())
    params = list(m.parameters())
    cfg = dict(training.TRAIN_DEFAULTS, lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    opt = training.make_optimizer(params, cfg, "cpu")
    for step in (0, 5, 50):
        lr, _ = training.update(params, opt, m.embed.weight.pow(2).sum(), step, cfg)
        assert len(opt.param_groups) == 2 and [g["lr"] for g in opt.param_groups] == [training.lr_at(step, cfg)] * 2


def test_a_data_parallel_runs_throughput_counts_every_ranks_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "check_ranks_agree", lambda *a: None)
    m = ReactiveTransformer(tiny_cfg())
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), max_iters=4)
    one = training.finish(cfg, m, None, [], stage="t", metrics={}, seconds=2.0, tokens=100, world=1)
    two = training.finish(cfg, m, None, [], stage="t", metrics={}, seconds=2.0, tokens=100, world=2)
    assert one["tokens_per_s"] == 50 and two["tokens_per_s"] == 100  # each rank counted its own 100 tokens


def test_a_constant_learning_rate_is_allowed_and_a_rising_one_refused():
    cfg = dict(training.TRAIN_DEFAULTS, lr=1e-3, min_lr=1e-3, device="cpu")
    training.setup(dict(cfg))  # min_lr = lr: a constant schedule
    with pytest.raises(cli.ConfigError, match="min_lr"):
        training.setup(dict(cfg, min_lr=2e-3))


@pytest.mark.parametrize("vocab", [40, 60])
def test_init_from_a_checkpoint_whose_vocab_is_not_the_tokenizers_is_refused(tmp_path, vocab):
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, ReactiveTransformer(tiny_cfg(vocab_size=vocab)), stage="joint", step=1, cfg={})

    class Tok:
        vocab_size = 50
    with pytest.raises(cli.CheckpointError, match=f"vocab {vocab}, tokenizer 50"):
        training.init_model(dict(training.TRAIN_DEFAULTS, init_from=path), Tok(), "cpu")


def test_a_finished_run_is_left_as_it_is(tmp_path):
    torch.manual_seed(0)
    m = ReactiveTransformer(tiny_cfg())
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, m, stage="t", step=3, cfg={}, metrics={"loss": 1.5, "seconds": 60.0})
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), max_iters=3, resume=True, compile=False)

    def never(*a):
        raise AssertionError("a finished run trains no further")
    metrics = training.train(cfg, m, stage="t", get_batch=never, loss_fn=never, params=list(m.parameters()),
                             device=torch.device("cpu"), ctx=contextlib.nullcontext())
    assert metrics == {"loss": 1.5, "seconds": 60.0}
    assert training.load_checkpoint(path)["metrics"] == {"loss": 1.5, "seconds": 60.0}  # not rewritten


@pytest.mark.parametrize("clip", [0.25, 4.0])
def test_gradients_are_clipped_at_grad_clip(clip):
    w = torch.nn.Parameter(torch.zeros(4))
    cfg = dict(training.TRAIN_DEFAULTS, lr=1e-3, min_lr=1e-4, warmup_iters=1, max_iters=10, grad_clip=clip)
    opt = training.make_optimizer([w], cfg, "cpu")
    _, norm = training.update([w], opt, w.sum(), 0, cfg)  # the gradient is all ones: norm 2
    assert norm.item() == pytest.approx(2.0) and w.grad.norm().item() == pytest.approx(min(2.0, clip), rel=1e-5)


def test_train_clips_parameters_given_as_a_generator(tmp_path):
    """The stage scripts pass model.parameters(): train must keep them, not let the optimizer use them up."""
    torch.manual_seed(0)
    model = ReactiveTransformer(tiny_cfg())
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), device="cpu", max_iters=2, eval_interval=100,
               eval_iters=1, warmup_iters=1, log_interval=1000, grad_clip=0.1)
    training.train(cfg, model, stage="test", get_batch=lambda split, step, g: None,
                   loss_fn=lambda model, batch, step, g: (model.embed.weight.pow(2).sum(), {}),
                   params=model.parameters(), device=torch.device("cpu"), ctx=contextlib.nullcontext())
    raw = 2 * model.embed.weight.detach().norm().item()  # ~ the unclipped norm (the weights moved one small step)
    assert raw > 0.5 and model.embed.weight.grad.norm().item() == pytest.approx(0.1, rel=1e-4)


def test_a_checkpoint_without_a_tokenizer_is_one_clear_error(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, ReactiveTransformer(tiny_cfg()), stage="mrl", step=1, cfg={}, tokenizer=None)
    with pytest.raises(cli.CheckpointError, match="carries no tokenizer"):
        training.load_for_inference(path)


def test_every_evaluation_scores_the_same_eval_iters_distinct_validation_batches():
    m = ReactiveTransformer(tiny_cfg())
    cfg = dict(training.TRAIN_DEFAULTS, eval_iters=3)
    drawn = []

    def get_batch(split, step, g):
        drawn.append((split, torch.randint(10**9, (1,), generator=g).item()))
        return None
    for step in (5, 50):
        training.evaluate(m, cfg, get_batch, lambda model, batch, step, g: (None, {"x": 1.0}),
                          contextlib.nullcontext(), torch.device("cpu"), step)
    assert all(split == "val" for split, _ in drawn)
    assert drawn[:3] == drawn[3:] and len({v for _, v in drawn[:3]}) == 3  # comparable from eval to eval


def test_the_final_checkpoint_is_at_max_iters_so_a_rerun_does_nothing(tmp_path):
    torch.manual_seed(0)
    m = ReactiveTransformer(tiny_cfg())
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), max_iters=2, eval_interval=100, eval_iters=1,
               warmup_iters=1, log_interval=1000, compile=False)
    calls = []
    run = lambda: training.train(cfg, m, stage="t", get_batch=lambda split, step, g: calls.append(split),
                                 loss_fn=lambda model, batch, step, g: (model.embed.weight.pow(2).sum(), {}),
                                 params=list(m.parameters()), device=torch.device("cpu"), ctx=contextlib.nullcontext())
    run()
    assert training.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2
    n = len(calls)
    run()
    assert len(calls) == n  # nothing repeated


@pytest.mark.parametrize("drop", ["model", "model_config", "stage", "step"])
def test_a_checkpoint_missing_any_part_is_refused(tmp_path, drop):
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, ReactiveTransformer(tiny_cfg()), stage="joint", step=1, cfg={})
    ckpt = torch.load(path, weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, path)
    with pytest.raises(cli.CheckpointError, match=rf"'{drop}'"):
        training.load_checkpoint(path)


def test_init_from_a_checkpoint_of_the_other_model_kind_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, StatelessDecoder(tiny_cfg()), stage="baseline", step=1, cfg={})

    class Tok:
        vocab_size = 50
    with pytest.raises(cli.CheckpointError, match="holds a StatelessDecoder"):
        training.init_model(dict(training.TRAIN_DEFAULTS, init_from=path), Tok(), "cpu")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_checkpoint_with_a_missing_or_unexpected_key_does_not_load(change):
    model = ReactiveTransformer(tiny_cfg())
    state = dict(model.state_dict())
    name = next(iter(state))
    if change == "missing":
        del state[name]
    else:
        state["extra.weight"] = torch.zeros(1)
    with pytest.raises(cli.CheckpointError, match="does not fit this model"):
        training.load_weights(model, state, "ckpt.pt")
