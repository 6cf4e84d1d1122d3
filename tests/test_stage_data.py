"""What each stage trains on and what it trains: the MLM stage's masks, joint training's parameter groups, the
memory pre-training's labels and its one-step writes, and that SFT and the baseline never train on their validation
data or on distances they were told to leave out."""

import contextlib
import math
import os

import pytest
import torch

import model as M
import train_baseline
import train_joint
import train_mlm
import train_mrl
import training
from conftest import TINY, tiny_flags
from data.loaders import episode_tensors
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer


def world_tok(world):
    return Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))


def tiny_model(tok, **overrides):
    torch.manual_seed(0)
    return M.ReactiveTransformer(M.get_config("nano", vocab_size=tok.vocab_size, **dict(TINY, **overrides)))


@pytest.mark.parametrize("stage", [train_mlm, train_joint])  # the MLM stage, and joint/SFT's MLM half
def test_the_mlm_tokens_are_hidden_behind_mask_not_pad(world, tmp_path, monkeypatch, stage):
    seen, real = [], M.ReactiveTransformer.mlm
    monkeypatch.setattr(M.ReactiveTransformer, "mlm",
                        lambda self, masked, mask, targets, chunks=None: seen.append((masked, targets)) or
                        real(self, masked, mask, targets, chunks))
    stage.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), max_iters=1, eval_iters=1))
    masked, targets = seen[0]
    assert (targets != -100).any() and (masked[targets != -100] == world_tok(world).mask_id).all()


def test_sft_decoder_never_reads_the_eds_padding(world, tmp_path, monkeypatch):
    seen, real = [], M.ReactiveTransformer.decode
    monkeypatch.setattr(M.ReactiveTransformer, "decode", lambda self, ids, memory, memory_mask=None, *a, **k:
                        seen.append(memory_mask) or real(self, ids, memory, memory_mask, *a, **k))
    train_joint.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), sft=True, max_iters=1, eval_iters=1))
    assert seen and all(m is not None and not m.all() for m in seen)  # interactions differ in length: some padding


def test_joint_training_updates_the_mlm_head_and_not_the_memory_attention(world, tmp_path):
    tok = world_tok(world)
    m = tiny_model(tok)
    init = str(tmp_path / "init.pt")
    training.save_checkpoint(init, m, stage="mlm", step=0, cfg={}, tokenizer=tok)
    train_joint.main(tiny_flags(data_dir=world, out_dir=str(tmp_path / "joint"), init_from=init, max_iters=2))
    after = training.load_checkpoint(str(tmp_path / "joint/ckpt.pt"))["model"]
    before = m.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"embed", "encoder", "decoder", "mlm_head"} <= changed and "memory_attention" not in changed


def numbered(monkeypatch, module):
    """Records read through module.read_jsonl carry their line number as 'i'."""
    real = module.read_jsonl
    monkeypatch.setattr(module, "read_jsonl", lambda path: [dict(r, i=i) for i, r in enumerate(real(path))])


def test_sft_never_trains_on_its_validation_records(world, tmp_path, monkeypatch):
    got, drawn = {}, []
    numbered(monkeypatch, train_joint)
    monkeypatch.setattr(train_joint.training, "train", lambda cfg, model, **kw: got.update(kw) or {})
    train_joint.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), sft=True))
    monkeypatch.setattr(train_joint, "collate_interactions",
                        lambda tok, records, n: drawn.extend(records) or [torch.zeros(1)] * 3)
    for step in range(100):
        got["get_batch"]("train", step, torch.Generator().manual_seed(step))
    n_val = max(1, len(read_jsonl(os.path.join(world, "interactions.jsonl"))) // 50)
    assert drawn and min(r["i"] for r in drawn) >= n_val


def test_the_baseline_trains_on_its_distances_and_never_on_its_validation_episodes(world, tmp_path,
                                                                                   monkeypatch):
    got, drawn = {}, []
    numbered(monkeypatch, train_baseline)
    monkeypatch.setattr(train_baseline.training, "train", lambda cfg, model, **kw: got.update(kw) or {})
    train_baseline.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), dialogue=True, distances=[1, 2],
                                   model_args=dict(TINY, seq_len=256), seq_len=256))
    monkeypatch.setattr(train_baseline, "collate_dialogues",
                        lambda tok, eps, n: drawn.extend(eps) or [torch.zeros(1, dtype=torch.long)] * 3)
    for step in range(100):
        got["get_batch"]("train", step, torch.Generator().manual_seed(step))
    kept = [i for i, ep in enumerate(read_jsonl(os.path.join(world, "episodes_train.jsonl"))) if ep["distance"] in (1, 2)]
    val = set(kept[:max(1, len(kept) // 50)])  # the first fiftieth of the kept episodes validates
    assert drawn and {ep["distance"] for ep in drawn} <= {1, 2} and not {ep["i"] for ep in drawn} & val


class MixStub(torch.nn.Module):
    """A memory attention that writes exactly the label of the documented schedule: 0.9, then 0.5 - 0.05 t."""

    def __init__(self):
        super().__init__()
        self.t = 0

    def forward(self, stm, ed, mask):
        w = 0.9 if self.t == 0 else 0.5 - 0.05 * self.t
        self.t += 1
        return (1 - w) * stm + w * ed


def test_memory_pretraining_labels_give_the_new_data_a_shrinking_share(world):
    tok = world_tok(world)
    model = tiny_model(tok)
    model.memory_attention = MixStub()
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:4]
    turns = episode_tensors(tok, eps, 64, "cpu", pad_to=model.cfg.stm_size)
    cfg = dict(train_mrl.DEFAULTS, mem_noise=0.0, mem_jitter=0.0)
    loss, _ = train_mrl.memory_pretrain_loss(model, turns, cfg, torch.Generator().manual_seed(0))
    assert len(turns) > 1 and loss.item() == pytest.approx(-1.0, abs=1e-5)  # cosine 1 at every turn, averaged


def test_memory_pretraining_trains_each_write_on_its_own_turn(world):
    tok = world_tok(world)
    model = tiny_model(tok)
    real = model.memory_attention

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.seen = real, []

        def forward(self, stm, ed, mask):
            self.seen.append(stm.requires_grad)
            return self.inner(stm, ed, mask)
    model.memory_attention = spy = Spy()
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:4]
    turns = episode_tensors(tok, eps, 64, "cpu", pad_to=model.cfg.stm_size)
    train_mrl.memory_pretrain_loss(model, turns, dict(train_mrl.DEFAULTS), torch.Generator().manual_seed(0))
    assert spy.seen == [False] * len(turns)


def test_memory_pretraining_writes_what_each_row_encodes_alone_whatever_its_padding(world, monkeypatch):
    tok = world_tok(world)
    model = tiny_model(tok, stm_size=64).eval()
    seen, real = [], model.memory_attention.forward
    monkeypatch.setattr(model.memory_attention, "forward", lambda stm, ed, mask: seen.append(ed) or real(stm, ed, mask))
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:4]
    turns = episode_tensors(tok, eps, 64, "cpu", pad_to=model.cfg.stm_size)
    train_mrl.memory_pretrain_loss(model, turns, dict(train_mrl.DEFAULTS), torch.Generator().manual_seed(0))
    S = model.cfg.stm_size
    lengths = [int(n) for n in turns[0][1][:, :S].sum(1)]
    assert min(lengths) < S  # rows padded: the padding must not reach what a row writes
    for b, n in enumerate(lengths):
        alone = model.encode(turns[0][0][b:b + 1, :n])  # (L, 1, n, D)
        torch.testing.assert_close(seen[0][:, b, :n], alone[:, 0], atol=1e-5, rtol=1e-4)


def test_story_stages_train_on_train_bin_and_evaluate_on_val_bin(world, tmp_path, monkeypatch):
    for module, extra in ((train_mlm, {}), (train_baseline, dict(dialogue=False, model_args={**TINY, "n_layers": 2}))):
        read, real = [], module.get_lm_batch
        monkeypatch.setattr(module, "get_lm_batch", lambda path, *a, **kw: read.append(os.path.basename(path)) or
                            real(path, *a, **kw))
        module.main(tiny_flags(**dict(dict(data_dir=world, out_dir=str(tmp_path / module.__name__), max_iters=2,
                                           eval_interval=2, eval_iters=1), **extra)))
        assert read == ["train.bin", "train.bin", "val.bin"], module.__name__  # two steps, then one evaluation


def test_the_baselines_loss_adds_the_weighted_balancing_loss(world, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_baseline.training, "train", lambda cfg, model, **kw: seen.update(kw, model=model) or {})
    train_baseline.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), dialogue=False, aux_weight=0.5,
                                   model_args={**TINY, "n_layers": 2}))
    batch = seen["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    loss, metrics = seen["loss_fn"](seen["model"], batch, 0, None)
    _, ar_loss, aux_loss = seen["model"](*batch)
    assert aux_loss.item() > 0.5  # about 1 for any routing: the term is there to see
    assert loss.item() == pytest.approx(ar_loss.item() + 0.5 * aux_loss.item(), rel=1e-5)


@pytest.mark.parametrize("draw,shift", [(0.0, -0.1), (1.0, 0.1)])
def test_memory_pretraining_jitters_the_new_datas_share_both_ways(world, monkeypatch, draw, shift):
    """The label's share w moves by up to mem_jitter either way: the draw at its lowest gives w = schedule - jitter,
    at its highest schedule + jitter."""
    tok = world_tok(world)
    model = tiny_model(tok)

    class Shifted(MixStub):
        def forward(self, stm, ed, mask):
            w = min(0.95, max(0.05, (0.9 if self.t == 0 else 0.5 - 0.05 * self.t) + shift))  # kept in [0.05, 0.95]
            self.t += 1
            return (1 - w) * stm + w * ed
    model.memory_attention = Shifted()
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:4]
    turns = episode_tensors(tok, eps, 64, "cpu", pad_to=model.cfg.stm_size)
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda size, **kw: torch.full(size if isinstance(size, tuple) else (size,),
                                                                     draw) if kw.get("generator") else rand(size, **kw))
    cfg = dict(train_mrl.DEFAULTS, mem_noise=0.0, mem_jitter=0.1)
    loss, _ = train_mrl.memory_pretrain_loss(model, turns, cfg, torch.Generator().manual_seed(0))
    assert loss.item() < -1 + 1e-5


def test_memory_pretraining_pads_every_turn_to_the_stm_size(world, monkeypatch):
    """Its label pairs token i with slot i, so every turn has at least as many positions as the STM has slots."""
    tok = world_tok(world)
    model = tiny_model(tok)
    seen = {}
    monkeypatch.setattr(train_mrl.training, "train", lambda cfg, model, **kw: seen.update(kw) or {})
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 1]
    cfg = dict(train_mrl.DEFAULTS, seq_len=64, batch_size=4, max_iters=2)
    train_mrl.train_mem(cfg, model, tok, {"train": {1: eps}}, "cpu", None, 0, 1)
    turns = seen["get_batch"]("train", 0, torch.Generator().manual_seed(0))
    assert all(ids.size(1) >= model.cfg.stm_size > 8 for ids, _, _ in turns)


def test_joint_training_evaluates_on_val_bin(world, tmp_path, monkeypatch):
    read, real = [], train_joint.get_lm_batch
    monkeypatch.setattr(train_joint, "get_lm_batch", lambda path, *a, **kw: read.append(os.path.basename(path)) or
                        real(path, *a, **kw))
    result = train_joint.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), max_iters=2, eval_interval=2,
                                         eval_iters=1))
    assert read == ["train.bin", "train.bin", "val.bin"]
    assert result["ppl"] == pytest.approx(math.exp(result["ar_loss"]))  # the perplexity of the validation loss


def test_the_baselines_dialogue_batches_are_drawn_from_the_steps_generator(world, tmp_path, monkeypatch):
    """Drawn from the generator of the step (not the global one): a resumed run sees the same batches."""
    seen = {}
    monkeypatch.setattr(train_baseline.training, "train", lambda cfg, model, **kw: seen.update(kw) or {})
    train_baseline.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), dialogue=True, distances=[1, 2],
                                   model_args={**TINY, "n_layers": 2}))
    draw = lambda: seen["get_batch"]("train", 3, torch.Generator().manual_seed(7))[0]
    first = draw()
    with torch.random.fork_rng():
        torch.manual_seed(123)  # the global generator moves on
        assert torch.equal(first, draw())


def test_the_mlm_stages_batches_are_drawn_from_the_steps_generator(world, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_mlm.training, "train", lambda cfg, model, **kw: seen.update(kw) or {})
    train_mlm.main(tiny_flags(data_dir=world, out_dir=str(tmp_path)))
    draw = lambda: seen["get_batch"]("train", 3, torch.Generator().manual_seed(7))
    first = draw()
    with torch.random.fork_rng():
        torch.manual_seed(123)  # the global generator moves on; a resumed run's step 3 must see the same batch
        assert torch.equal(first, draw())


def test_memory_pretraining_moves_the_memory_attention_and_nothing_else(world, tmp_path):
    """Stage 3 trains the write alone: the encoder, decoder, embedding and learned STM slots stay as they were."""
    tok = world_tok(world)
    model = tiny_model(tok, stm_init="learned")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2]
    cfg = dict(train_mrl.DEFAULTS, device="cpu", seq_len=64, batch_size=4, max_iters=3, eval_interval=100,
               eval_iters=1, warmup_iters=1, lr=1e-2, min_lr=1e-3, out_dir=str(tmp_path), mem_curriculum=[[2]])
    pools = {"train": {2: eps}, "val": {2: eps}}
    train_mrl.train_mem(cfg, model, tok, pools, torch.device("cpu"), contextlib.nullcontext(), 0, 1)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("memory_attention.") for n in moved), sorted(moved)
