"""Contracts of the training plumbing, the stage scripts, the RL objectives and the scores, each pinned by behaviour:
what a setting refuses and accepts, what a checkpoint holds, what the loop hands each step, which curriculum, split
and file a stage reads, and the formulas' terms and metrics. Tiny models and a byte-level world of their own (no
session world needed), so that each test takes well under a second or two."""

import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch

import cli
import engine
import rl
import scores
import train_baseline
import train_joint
import train_mlm
import train_mrl
import training
from conftest import tiny_flags
from data.loaders import episode_tensors
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer, save_ranks
from model import Critic, ReactiveTransformer, StatelessDecoder, get_config

SMALL = dict(d_model=16, n_layers=2, n_heads=2, n_q_heads=1, n_kv_heads=1, enc_ff_dim=16, n_experts=2, top_k=1,
             expert_dim=8, seq_len=64, stm_size=4)
COLOURS = ["red", "blue", "green", "pink"]


def byte_tok():
    return Tokenizer({bytes([i]): i for i in range(256)})  # 256 bytes + 8 specials: every text encodes, no training


def small_model(tok=None, kind=ReactiveTransformer, **kw):
    torch.manual_seed(0)
    return kind(get_config("nano", vocab_size=(tok or byte_tok()).vocab_size, **dict(SMALL, **kw)))


def episode(d, gold="red", name="Mia", i=0):
    """A memory episode of distance d: the fact, d - 1 fillers, the probe; recorded as the world records them."""
    fillers = [{"query": f"Say hi {i}.", "answer": "Hi."}] * (d - 1)
    return {"query": f"{name} likes {gold}.", "answer": "I see.", "distance": d, "gold": gold, "slot": "colour",
            "rivals": {"binding": "blue" if gold != "blue" else "red"}, "i": i,
            "interactions": fillers + [{"query": f"What does {name} like?", "answer": gold}]}


@pytest.fixture(scope="module")
def byte_world(tmp_path_factory):
    """A data_dir every stage script accepts: a byte tokenizer, story tokens, interactions and episodes."""
    out = tmp_path_factory.mktemp("byte_world")
    save_ranks(str(out / "tokenizer.tiktoken"), {bytes([i]): i for i in range(256)})
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 1000)):
        rng.integers(0, 256, n).astype(np.uint16).tofile(out / f"{split}.bin")
    with open(out / "interactions.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"query": f"Question {i}?", "answer": f"Answer {i}.", "i": i}) + "\n")
    with open(out / "episodes_train.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps(episode(1 + i % 2, COLOURS[i % 4], i=i)) + "\n")
    return str(out)


def cpu_cfg(**kw):
    return dict(dict(training.TRAIN_DEFAULTS, device="cpu", seq_len=64), **kw)


# -----------------------------------------------------------------------------
# training.setup, generators, optimizer, schedule


def test_setup_refuses_each_setting_just_past_its_bound_and_accepts_the_bound():
    for key, bad, good in [("batch_size", 0, 1), ("max_iters", 0, 1), ("lr", 0.0, 1e-9), ("grad_clip", 0.0, 1e-6),
                           ("eval_interval", 0, 1), ("eval_iters", 0, 1), ("log_interval", 0, 1), ("seq_len", 7, 8),
                           ("warmup_iters", -1, 0), ("weight_decay", -0.1, 0.0), ("seed", -1, 0),
                           ("min_lr", -1e-6, 0.0), ("dtype", "float16", "float32"), ("model_args", [], {})]:
        with pytest.raises(cli.ConfigError, match=key):
            training.setup(cpu_cfg(**{key: bad, "lr": 1e-3 if key != "lr" else bad}))
        training.setup(cpu_cfg(**{key: good, "lr": 1e-3 if key != "lr" else good, "min_lr": 0.0}))
    # the stage's own rules are checked too
    with pytest.raises(cli.ConfigError, match="mask_prob"):
        training.setup(cpu_cfg(mask_prob=0.95), dict(mask_prob=cli.between(0.01, 0.9)))


def test_setup_resolves_the_device_seeds_torch_and_picks_the_autocast():
    cfg = cpu_cfg(dtype="auto", seed=5)
    device, ctx, rank, world = training.setup(cfg)
    assert device == torch.device("cpu") and cfg["device"] == "cpu" and (rank, world) == (0, 1)
    assert isinstance(ctx, contextlib.nullcontext)  # auto on a CPU: fp32, no autocast
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))  # the global seed is the setting's
    _, ctx, _, _ = training.setup(cpu_cfg(dtype="float32"))
    assert isinstance(ctx, contextlib.nullcontext)
    _, ctx, _, _ = training.setup(cpu_cfg(dtype="bfloat16"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert training.resolve_device("cuda:1") == "cuda:1"
    assert training.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_generators_differ_by_seed_step_rank_and_split_and_repeat_for_the_same_ones():
    cpu = torch.device("cpu")

    def draw(seed=1, step=3, rank=0, split="train"):
        g_cpu, g = training.generators(dict(seed=seed), step, cpu, rank, split)
        assert g is g_cpu  # on the CPU the masks and noise come from the data generator itself
        return torch.randint(2**62, (1,), generator=g_cpu).item()
    draws = [draw(), draw(seed=2), draw(step=4), draw(rank=1), draw(split="val")]
    assert len(set(draws)) == 5 and draw() == draws[0]
    g = torch.Generator()
    assert training.device_generator(g, cpu) is g


def test_the_optimizer_takes_the_settings_lr_betas_and_decay_and_skips_frozen_parameters():
    m = small_model()
    m.mlm_head.requires_grad_(False)
    opt = training.make_optimizer(m.parameters(), dict(training.TRAIN_DEFAULTS, lr=3e-4, weight_decay=0.37), "cpu")
    held = [p for g in opt.param_groups for p in g["params"]]
    assert held and all(p.requires_grad for p in held)
    assert {id(p) for p in held} == {id(p) for p in m.parameters() if p.requires_grad}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.37 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_the_lr_stays_at_min_lr_after_max_iters_and_needs_no_warmup():
    cfg = dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    assert training.lr_at(150, cfg) == pytest.approx(1e-4) and training.lr_at(199, cfg) == pytest.approx(1e-4)
    assert training.lr_at(0, dict(cfg, warmup_iters=0)) == pytest.approx(1e-3)  # no warmup: the cosine from lr
    assert training.lr_at(10, dict(cfg, max_iters=10)) == pytest.approx(1e-3)  # warmup as long as the run: no 0/0


def test_update_returns_the_scheduled_lr():
    w = torch.nn.Parameter(torch.zeros(3))
    cfg = dict(training.TRAIN_DEFAULTS, lr=1e-3, min_lr=1e-4, warmup_iters=4, max_iters=20)
    opt = training.make_optimizer([w], cfg, "cpu")
    for step in (0, 2, 10):
        lr, _ = training.update([w], opt, w.sum(), step, cfg)
        assert lr == training.lr_at(step, cfg)


# -----------------------------------------------------------------------------
# Checkpoints


class Payload:
    """Not a tensor, dict or number: a pickled object that weights_only loading must refuse."""


def test_a_checkpoint_holds_its_config_kind_tokenizer_and_optimizer_and_empty_defaults(tmp_path):
    tok = byte_tok()
    m = small_model(kind=StatelessDecoder)
    opt = training.make_optimizer(m.parameters(), dict(training.TRAIN_DEFAULTS), "cpu")
    path = str(tmp_path / "a" / "b" / "ckpt.pt")  # the folders are made
    training.save_checkpoint(path, m, stage="baseline", step=3, cfg={"lr": 0.5}, tokenizer=tok, optimizer=opt)
    ckpt = training.load_checkpoint(path)
    assert ckpt["model_kind"] == "StatelessDecoder" and ckpt["config"] == {"lr": 0.5} and ckpt["stage"] == "baseline"
    assert ckpt["metrics"] == {} and ckpt["extra"] == {} and ckpt["model_config"]["d_model"] == 16
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    model, tok2, _ = training.load_for_inference(path)
    assert isinstance(model, StatelessDecoder) and not model.training  # ready for inference: eval mode
    assert tok2.encode("Mia likes red.") == tok.encode("Mia likes red.") and tok2.vocab_size == tok.vocab_size
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in m.state_dict().items())


def test_load_checkpoint_refuses_pickled_objects_and_files_that_are_not_dicts(tmp_path):
    m = small_model()
    evil = str(tmp_path / "evil.pt")
    torch.save({"model": m.state_dict(), "model_config": {}, "stage": "x", "step": 0, "hook": Payload()}, evil)
    with pytest.raises(cli.CheckpointError, match="cannot read checkpoint .*evil.pt"):
        training.load_checkpoint(evil)
    bare = str(tmp_path / "bare.pt")
    torch.save(torch.tensor(3.0), bare)
    with pytest.raises(cli.CheckpointError, match="bare.pt is not a nanoRxT checkpoint"):
        training.load_checkpoint(bare)


def test_model_from_checkpoint_defaults_to_rxt_and_names_bad_configs_kinds_and_the_misfit(tmp_path):
    m = small_model()
    path = str(tmp_path / "ckpt.pt")
    training.save_checkpoint(path, m, stage="joint", step=1, cfg={})
    ckpt = training.load_checkpoint(path)
    del ckpt["model_kind"]  # checkpoints from before the baseline existed
    assert isinstance(training.model_from_checkpoint(ckpt), ReactiveTransformer)
    for bad in (dict(d_model=15), dict(no_such_field=1)):  # a ValueError of the config, and a TypeError
        with pytest.raises(cli.CheckpointError, match="p.pt: bad model config"):
            training.model_from_checkpoint(dict(ckpt, model_config=dict(ckpt["model_config"], **bad)), "p.pt")
    with pytest.raises(cli.CheckpointError, match="unknown model kind 'Mamba'"):
        training.model_from_checkpoint(dict(ckpt, model_kind="Mamba"))
    with pytest.raises(cli.CheckpointError, match="size mismatch for embed.weight"):  # the first problem, named
        training.load_weights(small_model(d_model=32), ckpt["model"], path)


def test_init_model_applies_model_args_and_kind_and_refuses_unknown_model_args_and_overlong_batches():
    tok = byte_tok()
    cfg = dict(training.TRAIN_DEFAULTS, model_args=SMALL, seq_len=SMALL["seq_len"])
    m = training.init_model(cfg, tok, "cpu")
    assert isinstance(m, ReactiveTransformer) and m.cfg.d_model == 16 and m.cfg.vocab_size == tok.vocab_size
    assert isinstance(training.init_model(cfg, tok, "cpu", kind=StatelessDecoder), StatelessDecoder)
    with pytest.raises(cli.ConfigError, match="no_such_field"):
        training.init_model(dict(cfg, model_args={"no_such_field": 1}), tok, "cpu")
    with pytest.raises(cli.ConfigError, match=f"seq_len {SMALL['seq_len'] + 1} is longer"):
        training.init_model(dict(cfg, seq_len=SMALL["seq_len"] + 1), tok, "cpu")


def test_resuming_restores_extra_modules_trains_the_model_and_compiles_only_when_asked(tmp_path, monkeypatch):
    m = small_model()
    critic = torch.nn.Linear(3, 1)
    training.save_checkpoint(str(tmp_path / "ckpt.pt"), m, stage="mrl", step=2, cfg={},
                             extra={"critic": critic.state_dict()})
    fresh = torch.nn.Linear(3, 1)
    compiled = []
    monkeypatch.setattr(m, "compile", lambda: compiled.append(True))
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), compile=False)
    m.eval()
    _, step, _ = training.start(cfg, m, list(m.parameters()), stage="mrl", device="cpu",
                                extra_modules={"critic": fresh})
    assert step == 2 and torch.equal(fresh.weight, critic.weight) and torch.equal(fresh.bias, critic.bias)
    assert m.training and not compiled
    training.start(dict(cfg, compile=True), m, list(m.parameters()), stage="mrl", device="cpu",
                   extra_modules={"critic": fresh})
    assert compiled == [True]


# -----------------------------------------------------------------------------
# The loop


def test_evaluate_runs_in_eval_mode_without_gradients_and_leaves_the_model_training():
    m = small_model()
    seen = []

    def loss_fn(model, batch, step, g):
        seen.append((model.training, torch.is_grad_enabled()))
        return None, {"x": 2.0}
    out = training.evaluate(m, dict(training.TRAIN_DEFAULTS, eval_iters=2), lambda *a: None, loss_fn,
                            contextlib.nullcontext(), torch.device("cpu"), 0)
    assert seen == [(False, False)] * 2 and m.training and out == {"x": 2.0}


def test_train_hands_each_step_its_batch_and_reports_the_last_loss_and_the_tokens(tmp_path, capsys):
    m = small_model()
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), max_iters=4, eval_interval=2, eval_iters=1,
               warmup_iters=1, log_interval=1000)
    batches, steps = [], []

    def get_batch(split, step, g):
        if split == "train":
            batches.append((step, torch.randint(10**9, (1,), generator=g).item()))
        return step

    def loss_fn(model, batch, step, g):
        steps.append((step, batch))
        return model.embed.weight.sum() * 0 + 10.0 * step, {"tokens": 10}
    metrics = training.train(cfg, m, stage="t", get_batch=get_batch, loss_fn=loss_fn, params=list(m.parameters()),
                             device=torch.device("cpu"), ctx=contextlib.nullcontext(), batch_reuse=2)
    want = [(s, torch.randint(10**9, (1,), generator=training.generators(cfg, s, torch.device("cpu"))[0]).item()) for s in (0, 2)]
    assert batches == want  # a new batch every batch_reuse steps, drawn from that step's generator
    # (step, batch) of every loss: the training steps, and after steps 2 and 4 an evaluation (its batch: the step)
    assert steps == [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3)]
    assert metrics["train_loss"] == 30.0  # the last step's loss
    assert metrics["tokens_per_s"] * metrics["seconds"] == pytest.approx(40)  # all four steps' tokens
    out = capsys.readouterr().out
    assert "[t] step 2/4" in out and "[t] step 4/4" in out and "[t] done: 4 steps in" in out


def test_only_rank_zero_writes_and_a_run_without_tokens_reports_no_throughput(tmp_path, capsys):
    m = small_model()
    cfg = dict(training.TRAIN_DEFAULTS, out_dir=str(tmp_path), max_iters=4)
    training.checkpoint(cfg, m, None, stage="t", step=1, metrics={}, rank=1)
    training.finish(cfg, m, None, [], stage="t", metrics={}, seconds=2.0, tokens=100, rank=1)
    assert not os.listdir(tmp_path) and capsys.readouterr().out == ""
    metrics = training.finish(cfg, m, None, [], stage="t", metrics={"loss": 1.5}, seconds=2.0, tokens=0)
    assert metrics == {"loss": 1.5, "seconds": 2.0}
    assert f"[t] done: 4 steps in 2.0s  loss 1.5  seconds 2  -> {tmp_path / 'ckpt.pt'}" in capsys.readouterr().out


def test_show_gives_four_significant_digits_and_leaves_out_the_token_count():
    assert training.show({"loss": 1.23456, "tokens": 100, "acc": 0.5}) == "loss 1.235  acc 0.5"


def test_ranks_that_disagree_on_the_weights_stop_the_run(monkeypatch, capsys):
    params = [torch.ones(2, 2)]
    for offset in (0.0, 1.0):
        monkeypatch.setattr(training.dist, "all_gather",
                            lambda sums, x: [s.copy_(x + i * offset) for i, s in enumerate(sums)])
        if offset:
            with pytest.raises(RuntimeError, match=r"\[t\] ranks disagree"):
                training.check_ranks_agree(params, "t", 2, 0)
        else:
            training.check_ranks_agree(params, "t", 2, 0)
            assert "[t] all 2 ranks agree on the weights (checksum 4.000000)" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# scores


def test_normalize_keeps_digits_and_strips_the_ends():
    assert scores.normalize("  Room 42, please!  ") == "room 42 please"


def test_exact_match_ignores_the_references_padding_whatever_the_widths():
    ref = torch.tensor([[5, 6, 3], [7, 3, -1]])  # the second reference is one token shorter
    ref_mask = ref != -1
    ans = torch.tensor([[5, 6, 3, 0], [7, 3, 0, 0]])  # wider than the references
    assert scores.exact_match(ans, torch.tensor([3, 2]), ref, ref_mask).tolist() == [True, True]
    narrow = torch.tensor([[5, 6], [7, 3]])  # narrower: the first answer was cut short
    assert scores.exact_match(narrow, torch.tensor([2, 2]), ref, ref_mask).tolist() == [False, True]


# -----------------------------------------------------------------------------
# rl: rollouts and IMPO


def rl_cfg(**kw):
    return dict(train_mrl.DEFAULTS, seq_len=64, mrl_max_answer=4, mrl_reset_prob=0.0, **kw)


def test_a_rollout_samples_with_the_phases_settings_and_is_reproducible(monkeypatch):
    tok, m = byte_tok(), small_model()
    eps = [episode(2, c) for c in COLOURS]
    seen, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    rl.rollout(m, eps, tok, rl_cfg(mrl_temperature=0.7, mrl_top_k=5, mrl_top_p=0.9), g)
    assert all(kw["temperature"] == 0.7 and kw["top_k"] == 5 and kw["top_p"] == 0.9 and kw["generator"] is g
               and kw["max_new_tokens"] == 4 for kw in seen)
    seen.clear()
    rl.rollout(m, eps, tok, rl_cfg(mrl_top_k=0), g)
    assert all(kw["top_k"] is None for kw in seen)  # 0: no top-k filter
    a, b = (rl.rollout(m, eps, tok, rl_cfg(), torch.Generator().manual_seed(1)) for _ in range(2))
    assert all(torch.equal(x["ids"], y["ids"]) for x, y in zip(a["steps"], b["steps"]))


def test_impos_value_and_memory_terms_and_metrics_are_their_formulas():
    """Rewards that every row of a turn shares and a constant critic leave no advantage: the loss is then the value
    term, coef * (r - v)^2, and the memory term, reg * sqrt(t + 1) * MSE(STM_t, STM_t-1), averaged over the turns."""
    tok, m = byte_tok(), small_model()
    play = rl.rollout(m, [episode(2, c) for c in COLOURS], tok, rl_cfg(), torch.Generator().manual_seed(0))
    for s, r in zip(play["steps"], (0.7, 0.3)):
        s["reward"] = torch.full((4,), r)
    critic = lambda q, mask, stm: torch.full((q.size(0),), 0.2)
    off = dict(mrl_entropy_coef=0.0, mrl_kl_coef=0.0)
    loss, metrics = rl.impo_loss(m, critic, play, rl_cfg(mrl_value_coef=0.5, mrl_memory_reg=0.0, **off))
    assert loss.item() == pytest.approx(0.5 * ((0.7 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 2, rel=1e-5)
    assert metrics["reward"] == pytest.approx(0.5) and metrics["probe_reward"] == pytest.approx(0.3)
    assert metrics["tokens"] == sum(s["mask"].sum().item() for s in play["steps"])
    loss, _ = rl.impo_loss(m, critic, play, rl_cfg(mrl_value_coef=0.0, mrl_memory_reg=1.0, **off))
    with torch.no_grad():
        stm, want = m.update_memory(play["stm0"], *play["first"]), 0.0
        for t, s in enumerate(play["steps"], start=1):
            new = m.update_memory(stm, s["ids"], s["mask"], s["chunks"])
            want += math.sqrt(t + 1) * torch.nn.functional.mse_loss(new, stm).item() / len(play["steps"])
            stm = new
    assert want > 0 and loss.item() == pytest.approx(want, rel=1e-4)


def test_impo_on_a_single_episode_is_finite():
    tok, m = byte_tok(), small_model()
    play = rl.rollout(m, [episode(2)], tok, rl_cfg(), torch.Generator().manual_seed(0))
    loss, _ = rl.impo_loss(m, Critic(m), play, rl_cfg())
    assert math.isfinite(loss.item())  # one row: no batch to normalise its advantage over


# -----------------------------------------------------------------------------
# rl: DMPO


def dmpo_batch(tok, eps, kind="own"):
    return {"episodes": eps, "turns": episode_tensors(tok, eps, 64, "cpu"),
            "rejected": [(kind, None if kind == "own" else "pink") for _ in eps],
            "fallback": ["green" for _ in eps]}


def test_dmpo_falls_back_where_the_own_answer_is_right_or_empty_and_anchors_on_the_neutral_answer(monkeypatch):
    tok, m = byte_tok(), small_model()
    eps = [episode(1, "red"), episode(1, "blue"), episode(1, "red")]
    said = [tok.encode("red") + [tok.eos_id], [tok.eos_id, 0, 0, 0], tok.encode("zebra")[:4]]  # right, empty, wrong
    monkeypatch.setattr(engine, "generate", lambda *a, **kw: (torch.tensor(said), torch.tensor([4, 1, 4])))
    seen, real = [], rl.collate_interactions
    monkeypatch.setattr(rl, "collate_interactions", lambda t, records, n: seen.append(records) or real(t, records, n))
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, dmpo_anchor=0.5, dmpo_neutral="No idea.")
    rl.dmpo_loss(m, small_model(), dmpo_batch(tok, eps), cfg, tok, torch.Generator().manual_seed(0))
    assert [r["answer"] for r in seen[0]] == ["green", "green", "zebr"]
    assert [r["answer"] for r in seen[1]] == ["No idea."] * 3


def test_dmpo_draws_its_fresh_memory_from_the_given_generator(monkeypatch):
    tok, m = byte_tok(), small_model()
    batch = dmpo_batch(tok, [episode(2, c) for c in COLOURS], kind="other")
    first, real = [], m.update_memory
    monkeypatch.setattr(m, "update_memory", lambda stm, *a: first.append(stm) or real(stm, *a))
    torch.manual_seed(123)  # the global generator: not the one to draw from
    rl.dmpo_loss(m, small_model(), batch, dict(train_mrl.DEFAULTS, seq_len=64), tok, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], m.new_memory(4, generator=torch.Generator().manual_seed(3)))


# -----------------------------------------------------------------------------
# train_mrl: batches, losses, phases


def test_episode_batch_skips_distances_the_split_lacks_clamps_the_curriculum_and_reaches_the_pools_end():
    pools = {"train": {1: [episode(1, i=i) for i in range(4)], 2: [episode(2, i=i) for i in range(4)]},
             "val": {1: [episode(1, i=i) for i in range(4)]}}
    cfg = dict(batch_size=2, max_iters=10, length_buckets=1)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        assert {ep["distance"] for ep in train_mrl.episode_batch(cfg, pools, "val", 0, [[1, 2]], g)} == {1}
    assert {ep["distance"] for ep in train_mrl.episode_batch(cfg, pools, "train", 20, [[1], [2]],
                                                            torch.Generator().manual_seed(0))} == {2}
    buckets = dict(cfg, length_buckets=2)  # windows of 2 of the 4: the last one too
    drawn = {ep["i"] for s in range(40) for ep in train_mrl.episode_batch(buckets, pools, "train", 0, [[1]],
                                                                         torch.Generator().manual_seed(s))}
    assert drawn == {0, 1, 2, 3}


class ClampedMix(torch.nn.Module):
    """Writes exactly the documented label: a share 0.9, then 0.5 - 0.05 t, never below 0.05."""

    def __init__(self):
        super().__init__()
        self.t = 0

    def forward(self, stm, ed, mask):
        w = max(0.05, 0.9 if self.t == 0 else 0.5 - 0.05 * self.t)
        self.t += 1
        return (1 - w) * stm + w * ed


def test_memory_pretraining_never_gives_the_new_data_less_than_a_twentieth():
    m = small_model()
    m.memory_attention = ClampedMix()
    S = m.cfg.stm_size
    turns = [(torch.randint(0, 256, (2, S)), torch.ones(2, S, dtype=torch.bool), None) for _ in range(14)]
    loss, metrics = train_mrl.memory_pretrain_loss(m, turns, dict(train_mrl.DEFAULTS, mem_noise=0.0, mem_jitter=0.0),
                                                   torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(-1.0, abs=1e-5) and metrics["tokens"] == 14 * 2 * S  # averaged


def test_smat_reports_the_per_turn_loss_and_the_probes_own_loss_and_weights_the_balancing_loss(monkeypatch):
    m = small_model()
    turns = [(torch.randint(0, 256, (2, 6)), torch.ones(2, 6, dtype=torch.bool), torch.randint(0, 256, (2, 6)))
             for _ in range(3)]
    stm0 = m.new_memory(2, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(m, "new_memory", lambda *a, **kw: stm0)
    monkeypatch.setattr(m, "update_memory", lambda stm, *a: stm)  # every turn reads stm0
    loss = lambda w: train_mrl.smat_loss(m, turns, dict(train_mrl.DEFAULTS, smat_aux_weight=w),
                                         torch.Generator().manual_seed(0))
    total, metrics = loss(0.0)
    ce = [m.decode(ids, stm0, targets=t, attn_mask=mask)[1].item() for ids, mask, t in turns]
    assert total.item() == pytest.approx(sum(ce), rel=1e-5) and metrics["smat_loss"].item() == pytest.approx(
        sum(ce) / 3, rel=1e-5)
    assert metrics["probe_loss"].item() == pytest.approx(ce[-1], rel=1e-5) and metrics["tokens"] == 36
    one, two = loss(1.0)[0].item() - total.item(), loss(2.0)[0].item() - total.item()
    assert one > 0.5 and two == pytest.approx(2 * one, rel=1e-4)  # about 1 per turn, times the weight


def phase_pools():
    eps = {d: [dict(episode(d, COLOURS[i % 4], i=i)) for i in range(8)] for d in (1, 2)}
    return {"train": eps, "val": eps}


def captured(monkeypatch, phase, cfg, model, tok, **patches):
    seen = {}
    monkeypatch.setattr(train_mrl.training, "train", lambda cfg, model, **kw: seen.update(kw) or {})
    for name, value in patches.items():
        monkeypatch.setattr(train_mrl, name, value)
    train_mrl.TRAIN[phase](cfg, model, tok, phase_pools(), torch.device("cpu"), contextlib.nullcontext(), 0, 1)
    return seen


def test_each_phase_trains_under_its_name_on_its_own_curriculum(monkeypatch):
    tok, m = byte_tok(), small_model()
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, batch_size=4, max_iters=10, mem_curriculum=[[1]],
               smat_curriculum=[[2]], mrl_curriculum=[[1]], dmpo_curriculum=[[1]], mrl_ppo_epochs=3,
               init_from="start.pt", dmpo_pairs={"binding": 1.0})
    monkeypatch.setattr(train_mrl.training, "init_model", lambda *a, **kw: small_model())
    g = lambda: torch.Generator().manual_seed(0)
    mem = captured(monkeypatch, "mem", cfg, m, tok)
    assert mem["stage"] == "mem" and len(mem["get_batch"]("train", 0, g())) == 2  # distance 1: two turns
    smat = captured(monkeypatch, "smat", cfg, m, tok)
    assert smat["stage"] == "smat" and len(smat["get_batch"]("train", 0, g())) == 3
    mrl = captured(monkeypatch, "mrl", cfg, m, tok, rollout=lambda model, eps, *a: eps)
    assert mrl["stage"] == "mrl" and mrl["batch_reuse"] == 3
    assert {ep["distance"] for ep in mrl["get_batch"]("train", 0, g())} == {1}
    dmpo = captured(monkeypatch, "dmpo", cfg, m, tok)
    batch = dmpo["get_batch"]("train", 0, g())
    assert dmpo["stage"] == "dmpo" and {ep["distance"] for ep in batch["episodes"]} == {1}
    assert [kind for kind, _ in batch["rejected"]] == ["binding"] * 4  # the mix dmpo_pairs asks for
    # DMPO scores the policy against a frozen copy of the phase's start, never against the policy itself
    refs = []
    monkeypatch.setattr(train_mrl, "dmpo_loss", lambda model, reference, *a: refs.append(reference) or (0, {}))
    dmpo["loss_fn"](m, batch, 0, g())
    assert refs[0] is not m and not refs[0].training and not any(p.requires_grad for p in refs[0].parameters())
    # SMAT's loss sets the unfreeze schedule of the step it is given
    smat["loss_fn"](m, smat["get_batch"]("train", 0, g()), 0, g())
    assert not any(p.requires_grad for p in m.encoder.parameters())
    smat["loss_fn"](m, smat["get_batch"]("train", 9, g()), 9, g())
    assert all(p.requires_grad for p in m.encoder.parameters())


def test_train_mrl_refuses_out_of_range_phase_settings_before_any_work(tmp_path):
    base = ["--device=cpu", "--data_dir=/nonexistent", f"--out_dir={tmp_path / 'out'}", "--phases=mem,smat,mrl,dmpo"]
    for flag in ("--dmpo_pairs={}", "--dmpo_pairs={'other': 0.0}", "--dmpo_pairs={'bogus': 1.0}",
                 "--dmpo_pairs={'other': -1.0, 'binding': 2.0}", "--mem_jitter=0.5", "--mrl_reset_prob=1.5",
                 "--smat_unfreeze_encoder_at=1.5", "--mrl_top_p=0.001", "--mrl_ppo_epochs=0", "--mrl_max_answer=0",
                 "--length_buckets=0", "--mrl_clip_eps=0.0", "--dmpo_beta=0.0"):
        with pytest.raises(cli.ConfigError, match=flag[2:].partition("=")[0] + "=.*must be"):
            train_mrl.main(base + [flag])
    assert not (tmp_path / "out").exists()


def test_a_flag_for_a_phase_that_does_not_run_is_refused_before_any_work(tmp_path):
    base = ["--device=cpu", "--data_dir=/nonexistent", f"--out_dir={tmp_path / 'out'}", "--phases=smat"]
    for flag in ("--mrl_iters=5", "--dmpo_beta=0.2", "--mem_lr=1e-4"):
        with pytest.raises(cli.ConfigError, match=f"--{flag[2:].partition('=')[0]} would change nothing"):
            train_mrl.main(base + [flag])
    assert not (tmp_path / "out").exists()


def test_the_phases_run_in_the_order_given_each_from_the_previous_ones_checkpoint(tmp_path, monkeypatch, byte_world):
    ran = []
    for phase in train_mrl.PHASES:
        monkeypatch.setitem(train_mrl.TRAIN, phase, lambda cfg, *a, p=phase: ran.append((p, cfg["init_from"])) or {})
    monkeypatch.setattr(train_mrl.training, "init_model", lambda *a, **kw: None)  # the phases above train nothing
    train_mrl.main(["--device=cpu", f"--data_dir={byte_world}", f"--out_dir={tmp_path}", "--init_from=start.pt",
                    "--phases=smat,mem", "--smat_curriculum=[[1]]", "--mem_curriculum=[[1]]"])
    assert ran == [("smat", "start.pt"), ("mem", os.path.join(str(tmp_path), "smat", "ckpt.pt"))]


def test_a_curriculum_distance_absent_from_validation_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(train_mrl.TRAIN, "smat", lambda *a: {})  # were it not refused: no training
    save_ranks(str(tmp_path / "tokenizer.tiktoken"), {bytes([i]): i for i in range(256)})
    with open(tmp_path / "episodes_train.jsonl", "w") as f:  # 60 episodes: the first validates, and it is distance 1
        for i in range(60):
            f.write(json.dumps(episode(1 if i == 0 else 1 + i % 2, i=i)) + "\n")
    flags = ["--device=cpu", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--phases=smat",
             f"--model_args={SMALL!r}"]
    with pytest.raises(cli.ConfigError, match="smat_curriculum asks for distances absent from validation"):
        train_mrl.main(flags + ["--smat_curriculum=[[1], [2]]"])


# -----------------------------------------------------------------------------
# The story and interaction stages: what they check, read and train


def run_main(monkeypatch, module, byte_world, **flags):
    seen = {}
    monkeypatch.setattr(module.training, "train", lambda cfg, model, **kw: seen.update(kw, model=model, cfg=cfg) or {})
    module.main(tiny_flags(**dict(dict(data_dir=byte_world, out_dir="/nonexistent/out", model_args=SMALL), **flags)))
    return seen


@pytest.mark.parametrize("module,flags", [(train_mlm, {}), (train_joint, {}), (train_baseline, {})])
def test_story_stages_check_for_val_bin_before_any_work(tmp_path, byte_world, module, flags):
    for name in ("tokenizer.tiktoken", "train.bin"):
        os.symlink(os.path.join(byte_world, name), tmp_path / name)
    with pytest.raises(cli.UserError, match="val.bin not found"):
        module.main(tiny_flags(data_dir=str(tmp_path), out_dir=str(tmp_path / "out"), model_args=SMALL))


def test_the_mlm_stage_trains_embed_encoder_and_head_on_masks_of_mask_prob(monkeypatch, byte_world):
    seen = run_main(monkeypatch, train_mlm, byte_world, batch_size=4, seq_len=32, mask_prob=0.5)
    names = {n.split(".")[0] for n, p in seen["model"].named_parameters() if any(p is q for q in seen["params"])}
    assert seen["stage"] == "mlm" and names == {"embed", "encoder", "mlm_head"}
    assert seen["tokenizer"].vocab_size == 264  # checkpoints carry the tokenizer
    ids = seen["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    assert ids.shape == (4, 32)

    def masked_share(seen, ids):  # the share of tokens the stage's loss asks the MLM head for, and its metrics
        counted, real = [], seen["model"].mlm
        seen["model"].mlm = lambda masked, mask, targets: counted.append((targets != -100).float().mean()) or real(
            masked, mask, targets)
        _, metrics = seen["loss_fn"](seen["model"], ids, 0, torch.Generator().manual_seed(0))
        return counted[0], metrics

    share, metrics = masked_share(seen, ids)
    assert 0.35 < share < 0.65 and metrics["tokens"] == 128
    # unset, the share is the documented 15% (1,024 tokens: 3 sigma is 3.3 points, and 25% is 9 points away)
    seen = run_main(monkeypatch, train_mlm, byte_world, batch_size=16, seq_len=64)
    assert 0.117 < masked_share(seen, seen["get_batch"]("train", 0, torch.Generator().manual_seed(0)))[0] < 0.183
    for bad in (0.95, 0.005):
        with pytest.raises(cli.ConfigError, match="mask_prob"):
            train_mlm.main(tiny_flags(data_dir=byte_world, mask_prob=bad))


def test_joints_loss_weights_the_balancing_loss_and_adds_the_memory_noise_only_when_asked(monkeypatch, byte_world):
    seen = run_main(monkeypatch, train_joint, byte_world, batch_size=4, seq_len=32, aux_weight=0.5)
    assert seen["stage"] == "joint" and seen["tokenizer"].vocab_size == 264
    model, batch = seen["model"], seen["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    loss, m = seen["loss_fn"](model, batch, 0, torch.Generator().manual_seed(0))
    assert m["aux_loss"] > 0.5 and loss.item() == pytest.approx(
        (m["ar_loss"] + m["mlm_loss"] + 0.5 * m["aux_loss"]).item(), rel=1e-5)
    eds, memories = [], []
    real_mlm, real_decode = model.mlm, model.decode
    model.mlm = lambda *a: (lambda out: eds.append(out[0]) or out)(real_mlm(*a))
    model.decode = lambda ids, memory, *a: memories.append(memory) or real_decode(ids, memory, *a)
    for std in (0.0, 0.4):
        seen["cfg"]["noise_std"] = std
        seen["loss_fn"](model, batch, 0, torch.Generator().manual_seed(0))
    assert torch.equal(memories[0], eds[0])
    assert (memories[1] - eds[1]).std().item() == pytest.approx(0.4, rel=0.1)
    with pytest.raises(cli.ConfigError, match="ed_swap"):  # a share of the rows: at most all of them
        train_joint.main(tiny_flags(data_dir=byte_world, ed_swap=1.5))


def test_joints_copy_rows_replace_the_first_rows_of_pre_training_batches_only(monkeypatch, byte_world):
    seen = run_main(monkeypatch, train_joint, byte_world, batch_size=8, seq_len=32, copy_rows=0.25)
    ids, mask, targets = seen["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    bos, eos = seen["tokenizer"].bos_id, seen["tokenizer"].eos_id
    for row, m in zip(ids[:2], mask):  # span 10 at seq_len 32: [BOS] s gap s [EOS]
        real = row[m]
        assert real[0] == bos and real[-1] == eos and torch.equal(real[1:11], real[-11:-1])
    assert not any(row[0] == bos and row[row != seen["tokenizer"].pad_id][-1] == eos for row in ids[2:])
    memories, eds = [], []
    real_mlm, real_decode = seen["model"].mlm, seen["model"].decode
    seen["model"].mlm = lambda *a: (lambda out: eds.append(out[0]) or out)(real_mlm(*a))
    seen["model"].decode = lambda i, memory, *a: memories.append(memory) or real_decode(i, memory, *a)
    seen["cfg"].update(noise_std=0.0, ed_swap=0.0)
    seen["loss_fn"](seen["model"], (ids, mask, targets), 0, torch.Generator().manual_seed(0))
    assert torch.equal(memories[0][:, :2], eds[0][:, [7, 0]]) and torch.equal(memories[0][:, 2:], eds[0][:, 2:])
    sft = run_main(monkeypatch, train_joint, byte_world, batch_size=8, sft=True, copy_rows=0.5)
    batch = sft["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    assert (batch[0] == sft["tokenizer"].q_id).any(dim=1).all()  # every SFT row is still an interaction
    memories.clear(), eds.clear()
    real_mlm, real_decode = sft["model"].mlm, sft["model"].decode
    sft["model"].mlm = lambda *a: (lambda out: eds.append(out[0]) or out)(real_mlm(*a))
    sft["model"].decode = lambda i, memory, *a: memories.append(memory) or real_decode(i, memory, *a)
    sft["cfg"].update(noise_std=0.0, ed_swap=0.0)
    sft["loss_fn"](sft["model"], batch, 0, torch.Generator().manual_seed(0))
    assert torch.equal(memories[0], eds[0])  # and every row reads its own ED
    with pytest.raises(cli.ConfigError, match="copy_rows"):
        train_joint.main(tiny_flags(data_dir=byte_world, copy_rows=1.5))


@pytest.mark.parametrize("module,flags,file", [
    (train_joint, dict(sft=True), "interactions.jsonl"),
    (train_baseline, dict(dialogue=True, distances=[1, 2], seq_len=64), "episodes_train.jsonl")])
def test_validation_batches_come_from_the_first_fiftieth_only(monkeypatch, byte_world, module, flags, file):
    seen = run_main(monkeypatch, module, byte_world, batch_size=16, **flags)
    drawn = []
    monkeypatch.setattr(module, "collate_interactions" if module is train_joint else "collate_dialogues",
                        lambda tok, records, n: drawn.extend(records) or [torch.zeros(1, dtype=torch.long)] * 3)
    for step in range(20):
        seen["get_batch"]("val", step, torch.Generator().manual_seed(step))
    n_val = 200 // 50
    assert {r["i"] for r in drawn} == set(range(n_val))  # every validation record, and nothing else


def test_exact_match_refuses_an_answer_that_runs_past_the_reference():
    # the reference's tokens as a prefix is not enough: an answer with a token more is another answer
    from scores import exact_match
    ref, ref_mask = torch.tensor([[5, 6, 0]]), torch.tensor([[True, True, False]])
    ans = torch.tensor([[5, 6, 7]])
    assert not exact_match(ans, torch.tensor([3]), ref, ref_mask).item()
    assert exact_match(ans, torch.tensor([2]), ref, ref_mask).item()
    assert not exact_match(ans, torch.tensor([1]), ref, ref_mask).item()


def test_sft_trains_on_the_interactions_file_its_flag_names(monkeypatch, byte_world, tmp_path):
    for name in ("tokenizer.tiktoken", "interactions.jsonl"):
        os.symlink(os.path.join(byte_world, name), tmp_path / name)
    with open(tmp_path / "mine.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"query": f"Mine {i}?", "answer": "Yes.", "i": 1000 + i}) + "\n")
    seen = run_main(monkeypatch, train_joint, str(tmp_path), sft=True, sft_file="mine.jsonl")
    drawn = []
    monkeypatch.setattr(train_joint, "collate_interactions",
                        lambda tok, records, n: drawn.extend(records) or [torch.zeros(1, dtype=torch.long)] * 3)
    for split in ("train", "val"):
        seen["get_batch"](split, 0, torch.Generator().manual_seed(0))
    assert drawn and all(r["i"] >= 1000 for r in drawn)  # never the default interactions.jsonl beside it


def test_mrl_keeps_one_validation_episode_from_a_file_of_fewer_than_fifty(monkeypatch, byte_world, tmp_path):
    os.symlink(os.path.join(byte_world, "tokenizer.tiktoken"), tmp_path / "tokenizer.tiktoken")
    episodes = read_jsonl(os.path.join(byte_world, "episodes_train.jsonl"))[:20]
    with open(tmp_path / "few.jsonl", "w") as f:
        f.writelines(json.dumps(ep) + "\n" for ep in episodes)
    seen = {}
    monkeypatch.setitem(train_mrl.TRAIN, "smat", lambda pcfg, model, tok, pools, *a: seen.update(pools) or {})
    train_mrl.main(tiny_flags(data_dir=str(tmp_path), out_dir=str(tmp_path / "out"), model_args=SMALL,
                              phases="smat", episodes_file="few.jsonl", smat_curriculum=[[1]]))
    n_val = sum(len(v) for v in seen["val"].values())
    assert n_val == 1 and n_val + sum(len(v) for v in seen["train"].values()) == 20


def test_each_stage_writes_where_the_next_stage_looks_for_its_start():
    """The nano chain run by hand (README): a stage run with or without its config writes the checkpoint that the
    next stage's config starts from, and no two stages share a folder."""
    CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "config", "")

    def out(module, *files):
        return os.path.join(cli.configure(module.DEFAULTS, list(files))["out_dir"], "ckpt.pt")

    def start(module, file):
        return cli.configure(module.DEFAULTS, [file])["init_from"]

    assert out(train_mlm) == out(train_mlm, CONFIG + "nano_mlm.py") == start(train_joint, CONFIG + "nano_joint.py")
    assert out(train_joint) == out(train_joint, CONFIG + "nano_joint.py") == start(train_joint, CONFIG + "nano_sft.py")
    assert out(train_joint, CONFIG + "nano_sft.py") == start(train_mrl, CONFIG + "nano_mrl.py")
    defaults = [out(train_mlm), out(train_joint), out(train_joint, CONFIG + "nano_sft.py"), out(train_baseline)]
    assert len(set(defaults)) == len(defaults)
