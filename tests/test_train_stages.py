"""Stages 0-2 (train_mlm.py, train_joint.py): they learn, the decoder reads memory, runs resume exactly, torchrun works."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_joint
import train_mlm
import train_mrl
import cli
import training
from conftest import tiny_flags
from data.loaders import get_lm_batch, mlm_inputs, next_token_targets
from data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def joint_run(world, tmp_path_factory):
    """MLM then joint pre-training of a tiny model on the small world; returns (checkpoint path, final metrics)."""
    out = tmp_path_factory.mktemp("stages")
    mlm = train_mlm.main(tiny_flags(data_dir=world, out_dir=str(out / "mlm"), max_iters=500, eval_interval=500,
                                    lr=3e-3, min_lr=3e-4))
    joint = train_joint.main(tiny_flags(data_dir=world, out_dir=str(out / "joint"), init_from=str(out / "mlm/ckpt.pt"),
                                        max_iters=1000, eval_interval=1000, lr=3e-3, min_lr=3e-4))
    return str(out / "joint/ckpt.pt"), mlm, joint


def test_mlm_and_joint_losses_fall_far_below_chance_and_accuracy_beats_most_frequent_token(world, joint_run):
    _, mlm, joint = joint_run
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    chance_loss = math.log(tok.vocab_size)  # where an untrained model starts
    ids = np.memmap(os.path.join(world, "val.bin"), dtype=np.uint16, mode="r")
    top_freq = np.bincount(ids).max() / len(ids)  # accuracy of always guessing the most frequent token
    assert mlm["mlm_loss"] < 0.75 * chance_loss and mlm["mlm_acc"] > 2 * top_freq, (mlm, top_freq)
    assert joint["ar_loss"] < 0.4 * chance_loss and joint["ar_acc"] > 3 * top_freq, (joint, top_freq)
    assert joint["mlm_acc"] > 2 * top_freq


def test_joint_decoder_reads_the_encoded_memory(world, joint_run):
    """The decoder's loss is clearly lower with the encoder's ED of its own text than with the ED of another text."""
    ckpt = training.load_checkpoint(joint_run[0])
    model = training.model_from_checkpoint(ckpt).eval()
    tok = training.tokenizer_from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    ids = get_lm_batch(os.path.join(world, "val.bin"), 64, 64, generator=g)
    mask = ids != tok.pad_id
    targets = next_token_targets(ids, mask)
    with torch.no_grad():
        masked, _ = mlm_inputs(ids, mask, tok.mask_id, 0.15, g)
        ed = model.encode(masked, mask)
        own = model.decode(ids, ed, mask, targets)[1]
        other = torch.roll(torch.arange(64), 1)
        wrong = model.decode(ids, ed[:, other], mask[other], targets)[1]
    assert own < 0.96 * wrong, (own.item(), wrong.item())  # measured: 0.62 vs 0.67


def test_sft_trains_on_interactions_from_a_joint_checkpoint(world, joint_run, tmp_path):
    sft = train_joint.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), init_from=joint_run[0], sft=True,
                                      max_iters=30, eval_interval=30, lr=1e-3))
    ckpt = training.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["stage"] == "sft" and ckpt["step"] == 30
    assert sft["ar_loss"] < 0.5 * math.log(ckpt["model_config"]["vocab_size"])


def test_interrupted_run_resumes_to_the_same_weights(world, tmp_path):
    """n steps in one run == k steps, a crash, and a second run that resumes from the checkpoint."""
    def run(out_dir, crash_at=None):
        cfg = cli.configure(train_mlm.DEFAULTS, tiny_flags(data_dir=world, out_dir=str(out_dir), max_iters=24,
                                                                eval_interval=8))
        device, ctx, _, _ = training.setup(cfg)
        tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
        model = training.init_model(cfg, tok, device)

        def get_batch(split, step, g):
            if step == crash_at and split == "train":
                raise KeyboardInterrupt
            return get_lm_batch(os.path.join(world, f"{split}.bin"), 16, 64, generator=g)

        def loss_fn(model, ids, step, g):
            masked, targets = mlm_inputs(ids, ids != tok.pad_id, tok.mask_id, 0.15, g)
            _, loss, acc = model.mlm(masked, ids != tok.pad_id, targets)
            return loss, {"mlm_loss": loss.detach(), "mlm_acc": acc}
        training.train(cfg, model, stage="mlm", get_batch=get_batch, loss_fn=loss_fn, params=model.parameters(),
                       device=device, ctx=ctx, tokenizer=tok)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=13)  # the last checkpoint is at step 8
    assert training.load_checkpoint(str(tmp_path / "b/ckpt.pt"))["step"] == 8
    resumed = run(tmp_path / "b")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_a_bad_init_checkpoint_is_one_clear_line(world, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "train_joint.py", *tiny_flags(data_dir=world, out_dir=str(out),
                                                                     init_from=str(bad), max_iters=2)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot read checkpoint")
    assert not out.exists()


def test_two_process_torchrun_trains_and_ranks_agree(world, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_mlm.py", *tiny_flags(data_dir=world, out_dir=str(tmp_path), max_iters=6,
                                                    eval_interval=6, batch_size=8)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    # a rank's own error comes first and torchrun's summary last: show both
    assert r.returncode == 0, r.stderr[:1500] + "\n...\n" + r.stderr[-1000:]
    assert "all 2 ranks agree on the weights" in r.stdout
    assert training.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 6


def test_each_rank_trains_on_its_own_batches(world, tmp_path):
    """Under torchrun every rank draws its own data (seeded by its rank): data parallelism, not one batch twice."""
    seen = {}
    for rank in (0, 1):
        cfg = cli.configure(train_mlm.DEFAULTS, tiny_flags(data_dir=world, out_dir=str(tmp_path / str(rank)),
                                                                max_iters=2, eval_interval=2))
        device, ctx, _, _ = training.setup(cfg)
        tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
        model = training.init_model(cfg, tok, device)

        def get_batch(split, step, g):
            ids = get_lm_batch(os.path.join(world, f"{split}.bin"), 16, 64, generator=g)
            if split == "train":
                seen.setdefault(rank, []).append(ids)
            return ids

        def loss_fn(model, ids, step, g):
            masked, targets = mlm_inputs(ids, ids != tok.pad_id, tok.mask_id, 0.15, g)
            return model.mlm(masked, ids != tok.pad_id, targets)[1], {}
        training.train(cfg, model, stage="mlm", get_batch=get_batch, loss_fn=loss_fn, params=model.parameters(),
                       device=device, ctx=ctx, rank=rank, world=1, tokenizer=tok)
    assert all(not torch.equal(a, b) for a, b in zip(seen[0], seen[1]))


def test_ed_swap_gives_a_share_of_rows_another_rows_memory_and_mask():
    """Joint/SFT's ed_swap: swapped rows read the previous row's ED and padding mask, the others their own."""
    ed, mask = torch.randn(2, 6, 5, 4), torch.rand(6, 5) > 0.3
    same = train_joint.swap_memory(ed, mask, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same[0], ed) and torch.equal(same[1], mask)
    every = train_joint.swap_memory(ed, mask, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(every[0], ed.roll(1, dims=1)) and torch.equal(every[1], mask.roll(1, dims=0))
    half, half_mask = train_joint.swap_memory(ed, mask, 0.5, torch.Generator().manual_seed(0))
    swapped = [b for b in range(6) if torch.equal(half[:, b], ed[:, b - 1]) and torch.equal(half_mask[b], mask[b - 1])]
    kept = [b for b in range(6) if torch.equal(half[:, b], ed[:, b]) and torch.equal(half_mask[b], mask[b])]
    assert swapped and kept and len(swapped) + len(kept) == 6


def test_copy_rows_ask_for_the_second_copy_and_never_read_their_own_ed():
    """Joint pre-training's copy rows: `[BOS] s gap s [EOS]`, the targets are the second copy from its second token
    (an induction head's job), the gap varies, and a copy row always reads another row's ED."""
    class Tok:  # the three things copy_rows uses
        ranks, pad_id, bos_id, eos_id = dict.fromkeys(range(50)), 60, 61, 62
    ids, mask, targets = train_joint.copy_rows(8, 64, Tok, torch.Generator().manual_seed(0))
    gaps = set()
    for row, m, t in zip(ids, mask, targets):
        real = row[m]
        assert real[0] == 61 and real[-1] == 62 and torch.equal(m, row != 60)
        s, gap = real[1:17], len(real) - 2 - 32
        assert torch.equal(real[-17:-1], s) and (real[1:-1] < 50).all()
        start = 1 + 16 + gap
        assert torch.equal(t[start:start + 15], s[1:]) and (t[:start] == -100).all() and (t[start + 15:] == -100).all()
        gaps.add(gap)
    assert len(gaps) > 1 and max(gaps) < 16
    ed, emask = torch.randn(2, 6, 5, 4), torch.rand(6, 5) > 0.3
    out, out_mask = train_joint.swap_memory(ed, emask, 0.0, torch.Generator().manual_seed(0), always=2)
    assert torch.equal(out[:, :2], ed[:, [5, 0]]) and torch.equal(out_mask[:2], emask[[5, 0]])
    assert torch.equal(out[:, 2:], ed[:, 2:])


def test_joint_training_reads_a_detached_ed_so_only_the_mlm_loss_trains_the_encoder(world, tmp_path, monkeypatch):
    from model import ReactiveTransformer
    reads, real = [], ReactiveTransformer.decode

    def decode(self, ids, memory, *args, **kw):
        reads.append(memory.requires_grad)
        return real(self, ids, memory, *args, **kw)

    monkeypatch.setattr(ReactiveTransformer, "decode", decode)
    for sft in (False, True):
        train_joint.main(tiny_flags(data_dir=world, out_dir=str(tmp_path / str(sft)), max_iters=2, eval_iters=1,
                                    eval_interval=2, sft=sft, ed_swap=0.5))
    assert reads and not any(reads)


def test_each_mrl_phase_starts_from_the_checkpoint_the_phase_before_wrote(world, tmp_path, monkeypatch):
    starts, real = [], train_mrl.training.init_model
    monkeypatch.setattr(train_mrl.training, "init_model", lambda cfg, *a, **kw: starts.append(cfg["init_from"]) or
                        real(cfg, *a, **kw))
    out = tmp_path / "mrl"
    train_mrl.main(tiny_flags(data_dir=world, out_dir=str(out), phases="mem,smat", mem_iters=1, smat_iters=1,
                              eval_iters=1))
    assert starts == ["", str(out / "mem" / "ckpt.pt")]
