"""Bad input at every entry point: one line saying what is wrong, a non-zero exit, no traceback, nothing written.
Each entry point gets a value out of range, an unknown name and an unreadable file."""

import os
import subprocess
import sys

import pytest
import torch

import bench
import chat
import demo
import evaluate
import train_baseline
import train_joint
import train_mlm
import train_mrl
import cli
import training
from conftest import TINY
from data import memory_world, tinystories, tokenizer
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, StatelessDecoder, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(main, argv, capsys):
    """main through training.cli, as its script runs it: the exit code and what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), (words, err)


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    training.save_checkpoint(path, ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY)),
                             stage="smat", step=0, cfg={}, tokenizer=tok)
    return path


@pytest.fixture()
def garbage(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"")  # an empty file: the classic interrupted copy
    return str(path)


def stage_cases(world, out):
    flags = ["--device=cpu", f"--data_dir={world}", f"--out_dir={out}"]
    return [
        (train_mlm.main, flags + ["--batch_size=-4"], ["batch_size"]),
        (train_mlm.main, flags + ["--max_iters=0"], ["max_iters"]),
        (train_mlm.main, flags + ["--preset=pico"], ["pico"]),
        (train_mlm.main, flags + ["--mask_prob=1.5"], ["mask_prob"]),
        (train_joint.main, flags + ["--lr=-1e-3"], ["lr"]),
        (train_joint.main, flags + ["--min_lr=0.5"], ["min_lr"]),
        (train_joint.main, flags + ["--device=cuda:3"], ["cuda"]),
        (train_joint.main, flags + ["--model_args={'gate_type': 'sigmoid'}"], ["gate_type"]),
        (train_joint.main, ["--device=cpu", "--data_dir=/nowhere", f"--out_dir={out}"], ["not found", "memory_world"]),
        (train_mrl.main, flags + ["--phases=smat,mrll"], ["mrll"]),
        (train_mrl.main, flags + ["--phases=smat", "--mrl_iters=5"], ["mrl_iters"]),
        (train_mrl.main, flags + ["--smat_curriculum=[[1], [99]]"], ["99"]),
        (train_mrl.main, flags + ["--mrl_top_p=2.0"], ["mrl_top_p"]),
        (train_mrl.main, flags + ["--max_iters=10"], ["max_iters"]),  # each phase has its own
        (train_baseline.main, flags + ["--distances=[]"], ["distances"]),
        (train_baseline.main, flags + ["--dialogue=True", "--distances=[99]"], ["99"]),
        (train_baseline.main, flags + ["--dialogue=True", "--distances=[1,99]"], ["99"]),
    ] + [(main, flags + ["--seq_len=4096"], ["seq_len 4096", "context"])  # longer than the nano model's 128
         for main in (train_mlm.main, train_joint.main, train_mrl.main, train_baseline.main)]


def test_training_scripts_refuse_bad_settings_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "out"
    for main, argv, words in stage_cases(world, out):
        code, err = run(main, argv, capsys)
        assert_one_line_error(code, err, *words)
        assert code == (1 if "not found" in words else 2), (argv, "a setting exits 2, a missing file 1")
        assert not out.exists(), (argv, "wrote something")


def test_training_scripts_refuse_unreadable_checkpoints(world, tmp_path, garbage, capsys):
    out = tmp_path / "out"
    for main in (train_mlm.main, train_joint.main, train_mrl.main, train_baseline.main):
        code, err = run(main, ["--device=cpu", f"--data_dir={world}", f"--out_dir={out}", f"--init_from={garbage}"],
                        capsys)
        assert_one_line_error(code, err, "cannot read checkpoint")
        assert not out.exists()


def test_evaluate_refuses_bad_settings(world, ckpt, garbage, tmp_path, capsys):
    out = str(tmp_path / "eval.json")
    base = [f"--ckpt={ckpt}", f"--data_dir={world}", f"--out={out}", "--device=cpu"]
    for argv, words, want in [(base + ["--distances=[99]"], ["99", "has episodes at"], 2),
                              (base + ["--n_per_distance=0"], ["n_per_distance"], 2),
                              (base + ["--max_answer=1000"], ["max_answer"], 2),  # one budget too long is enough
                              (base + ["--max_turn_answer=1000"], ["max_turn_answer"], 2),
                              (base + ["--episodes_file=nope.jsonl"], ["nope.jsonl"], 1),
                              ([f"--ckpt={garbage}", f"--data_dir={world}", f"--out={out}"],
                               ["cannot read checkpoint"], 1),
                              (base + ["--distance=[1]"], ["unknown config key 'distance'"], 2)]:
        code, err = run(evaluate.main, argv, capsys)
        assert_one_line_error(code, err, *words)
        assert code == want, (argv, "a setting exits 2, a file problem 1")
        assert not os.path.exists(out)


def test_chat_refuses_bad_sampling_flags_and_checkpoints(ckpt, garbage, tmp_path, capsys):
    for argv, words, want in [([f"--ckpt={ckpt}", "--temperature=-1"], ["temperature"], 2),
                              ([f"--ckpt={ckpt}", "--top_p=2"], ["top_p"], 2),
                              ([f"--ckpt={ckpt}", "--top_k=-5"], ["top_k"], 2),
                              ([f"--ckpt={ckpt}", "--max_new_tokens=100000"], ["max_new_tokens"], 2),
                              ([f"--ckpt={garbage}"], ["cannot read checkpoint"], 1),
                              ([f"--ckpt={tmp_path / 'none.pt'}"], ["not found", "demo.py"], 1),
                              ([f"--ckpt={ckpt}", "--temprature=0.5"], ["unknown config key"], 2)]:
        code, err = run(chat.main, argv, capsys)
        assert_one_line_error(code, err, *words)
        assert code == want, (argv, "a setting exits 2, a file problem 1")


def test_demo_refuses_unknown_options_before_the_first_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes out/nano here if it starts
    for argv, words in [(["--no-chta"], ["--no-chta"]), (["--device=gpu"], ["device"]),
                        (["--compile=yes"], ["compile"]),
                        (["--dtype=float16"], ["dtype"])]:
        code, err = run(demo.main, argv, capsys)
        assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_bench_refuses_bad_flags(tmp_path, garbage, capsys):
    out = str(tmp_path / "b.json")
    for argv, words in [(["--turns=1"], ["turns"]), (["--sections=convo"], ["convo"]),
                        (["--seq_lens=1k"], ["seq_lens"]), (["--threads=0"], ["threads"]),
                        (["--ckpt=" + garbage, "--sections=conversation"], ["cannot read checkpoint"])]:
        code, err = run(bench.main, argv + ["--quick", f"--out={out}"], capsys)
        assert_one_line_error(code, err, *words)
        assert not os.path.exists(out)


def test_data_modules_refuse_bad_flags_and_missing_or_empty_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    for main, argv, words in [
        (memory_world.main, ["--out_dir", str(out), "--vocab_size", "100"], ["vocab_size"]),
        (memory_world.main, ["--out_dir", str(out), "--binding", "2"], ["binding"]),
        (memory_world.main, ["--out_dir", str(out), "--n_episodes", "-1"], ["n_episodes"]),
        (memory_world.main, ["--out_dir", str(out), "--seeds", "1"], ["unrecognized arguments"]),
        (tokenizer.main, ["--input", str(empty), "--out", str(out / "t.tiktoken")], ["no text"]),
        (tokenizer.main, ["--input", str(tmp_path / "nope.txt"), "--out", str(out / "t.tiktoken")], ["not found"]),
        (tokenizer.main, ["--input", str(empty), "--out", str(out / "t"), "--vocab_size", "100"], ["vocab_size"]),
        (tinystories.main, ["--out_dir", str(out), "--train_path", str(tmp_path / "nope.txt")], ["not found"]),
        (tinystories.main, ["--out_dir", str(out), "--vocab_size", "10"], ["vocab_size"]),
    ]:
        code, err = run(main, argv, capsys)
        assert_one_line_error(code, err, *words)
        assert not out.exists(), argv


def test_tinystories_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tinystories, "URL_BASE", "http://127.0.0.1:9/")  # nothing listens on the discard port
    out = tmp_path / "ts"
    code, err = run(tinystories.main, ["--out_dir", str(out)], capsys)
    assert_one_line_error(code, err, "download", "--train_path")
    assert not out.exists()


@pytest.mark.parametrize("cmd", [["train_mrl.py", "--phases=smat,oops"], ["evaluate.py", "--ckpt=/nope.pt"],
                                 ["bench.py", "--turns=0"], ["-m", "data.tokenizer", "--input", "/nope.txt", "--out",
                                                              "/tmp/x.tiktoken"], ["demo.py", "--what"]])
def test_as_scripts_they_print_no_traceback(cmd):
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr


def test_settings_refuse_a_bool_for_a_number_zero_for_a_positive_one_and_distance_zero():
    with pytest.raises(cli.ConfigError, match="lr"):
        cli.configure({"lr": 1e-3}, ["--lr=True"])
    assert cli.configure({"lr": 1e-3}, ["--lr=1"])["lr"] == 1.0  # an int is a fine float
    with pytest.raises(cli.ConfigError, match="lr"):
        cli.check({"lr": 0}, lr=cli.POSITIVE)
    with pytest.raises(cli.ConfigError, match="distances"):
        cli.check({"distances": [0, 1]}, distances=cli.DISTANCES)
    for bad in ([[1], [0]], [[1, 2], "4"]):  # every entry is checked, not only the first
        with pytest.raises(cli.ConfigError, match="smat_curriculum"):
            cli.check({"smat_curriculum": bad}, smat_curriculum=cli.CURRICULUM)
    for value, rule in (("abc", cli.POSITIVE), ([1], cli.at_least(0))):  # a rule that raises on the type: a bad value
        with pytest.raises(cli.ConfigError, match="lr"):
            cli.check({"lr": value}, lr=rule)
    cli.check({"lr": 1e-9, "distances": [1, 2]}, lr=cli.POSITIVE, distances=cli.DISTANCES)


def test_a_bad_setting_exits_2_and_a_missing_file_exits_1(tmp_path, capsys):
    """Scripts tell the two apart: 2 for a bad flag or setting (fix the command), 1 for a file problem."""
    for main, argv in [(bench.main, ["--turns=1", "--quick"]), (bench.main, ["--no-such-flag"]),
                       (memory_world.main, ["--no-such-flag"]), (train_mlm.main, ["--max_iters=0"])]:
        code, err = run(main, argv, capsys)
        assert code == 2, (main.__module__, argv, err)
    code, err = run(train_mlm.main, [f"--data_dir={tmp_path / 'nowhere'}"], capsys)
    assert code == 1 and "not found" in err


def test_sft_checks_its_interactions_file_before_any_work(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(train_joint.main, [f"--data_dir={world}", "--sft=True", "--sft_file=nope.jsonl",
                                       f"--out_dir={out}", "--device=cpu"], capsys)
    assert_one_line_error(code, err, "nope.jsonl", "not found")
    assert code == 1 and not out.exists()


def test_chat_refuses_a_stateless_baseline_checkpoint(tmp_path, capsys):
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    path = str(tmp_path / "base.pt")
    training.save_checkpoint(path, StatelessDecoder(get_config("nano", vocab_size=tok.vocab_size, **TINY)),
                             stage="baseline", step=1, cfg={}, tokenizer=tok)
    code, err = run(chat.main, [f"--ckpt={path}"], capsys)
    assert_one_line_error(code, err, "stateless baseline")
