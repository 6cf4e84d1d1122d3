"""chat.py: scripted conversations through stdin, commands, bad checkpoints, and the memory really being written."""

import io
import os
import subprocess
import sys
import time

import pytest
import torch

import chat
import engine
import training
from conftest import TINY
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    path = str(tmp_path_factory.mktemp("chat") / "ckpt.pt")
    training.save_checkpoint(path, model, stage="mrl", step=0, cfg={}, tokenizer=tok)
    return path


def run_chat(ckpt, stdin, *flags):
    return subprocess.run([sys.executable, "chat.py", f"--ckpt={ckpt}", "--max_new_tokens=8", *flags], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_scripted_conversation_with_commands_ends_cleanly_at_eof(checkpoint):
    r = run_chat(checkpoint, "Mia has a red ball.\n\n/memory\nWhat colour is Mia's ball?\n/reset\n/help\nHi!\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("you> ") == 3 and out.count("rxt> ") == 3  # the empty line was ignored
    assert "you> What colour is Mia's ball?" in out
    assert "layer 0: mean slot norm" in out and "last update changed it by" in out
    assert "(memory reset)" in out and "/reset" in out.split("(memory reset)")[1]  # the help text follows
    assert "Traceback" not in r.stderr and "truncated" not in r.stderr  # short inputs are never cut


def test_over_long_input_is_truncated_with_a_notice(checkpoint):
    r = run_chat(checkpoint, "word " * 500 + "\n")
    assert r.returncode == 0 and "truncated" in r.stderr and "rxt> " in r.stdout


@pytest.mark.parametrize("content", [None, b"garbage, not a checkpoint", "wrong-shape"])
def test_missing_corrupt_or_incompatible_checkpoint_is_a_one_line_error(checkpoint, tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "wrong-shape":
        ckpt = torch.load(checkpoint, weights_only=True)
        ckpt["model_config"]["d_model"] = 64  # weights no longer fit the config
        torch.save(ckpt, path)
    elif content is not None:
        path.write_bytes(content)
    r = run_chat(str(path), "hello\n")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")


def test_memory_is_written_after_each_turn_and_reset_restores_a_fresh_one(checkpoint):
    model, tok, _ = chat.load(dict(chat.DEFAULTS, ckpt=checkpoint))
    session = chat.Session(model, tok, dict(chat.DEFAULTS, max_new_tokens=8))
    fresh = session.stm.clone()
    sink = open(os.devnull, "w")
    session.answer("Mia has a red ball.", sink)
    session.answer("Tom has a cat.", sink)
    session.wait()
    assert not torch.allclose(session.stm, fresh)
    assert session.previous is not None and not torch.allclose(session.stm, session.previous)
    session.reset()
    assert session.stm.shape == fresh.shape and session.previous is None
    assert session.stm.std().item() == pytest.approx(model.cfg.stm_init_std, rel=0.2)


def test_the_next_answer_reads_the_finished_write_of_query_answer_and_eos(checkpoint, monkeypatch):
    """The update runs in the background, slowly here: the next answer must wait for it and read its STM_t, and what
    was written is the whole turn - [BOS][Q] query [A], the answer the user saw, [EOS]."""
    model, tok, _ = chat.load(dict(chat.DEFAULTS, ckpt=checkpoint))
    session = chat.Session(model, tok, dict(chat.DEFAULTS, max_new_tokens=8))
    real_update, real_interact = model.update_memory, engine.interact
    writes, reads, said = [], [], []

    def slow_update(stm, ids, attn_mask=None, chunks=None):
        time.sleep(0.3)
        writes.append((ids[0].tolist(), real_update(stm, ids, attn_mask, chunks)))
        return writes[-1][1]

    def spy_interact(m, query_ids, stm, **kw):
        reads.append((list(query_ids), stm))
        said.append([])
        for t in real_interact(m, query_ids, stm, **kw):
            said[-1].append(t)
            yield t
    monkeypatch.setattr(model, "update_memory", slow_update)
    monkeypatch.setattr(engine, "interact", spy_interact)
    sink = open(os.devnull, "w")
    session.answer("Mia has a red ball.", sink)
    session.answer("Where is Mia?", sink)  # asked while the first write still sleeps
    session.wait()
    assert reads[1][1] is writes[0][1]  # the second answer read STM_1, the finished first write
    assert writes[0][0] == reads[0][0] + said[0] + [tok.eos_id]
    assert reads[0][0] == [tok.bos_id, tok.q_id] + tok.encode("Mia has a red ball.") + [tok.a_id]


def test_sampling_with_top_k_off_answers(checkpoint):
    """top_k=0 means no top-k filter (the default), not 'keep zero tokens'."""
    model, tok, _ = chat.load(dict(chat.DEFAULTS, ckpt=checkpoint))
    session = chat.Session(model, tok, dict(chat.DEFAULTS, max_new_tokens=8, temperature=1.0, top_k=0))
    assert isinstance(session.answer("Mia has a red ball.", io.StringIO()), str)
    session.wait()


def test_commands_reach_the_session_and_an_unknown_one_never_reaches_the_model(monkeypatch, capsys):
    class Session:
        calls = []

        def reset(self):
            self.calls.append("reset")

        def memory_report(self):
            return "report"

        def answer(self, query, out):
            self.calls.append(query)
            out.write("ok")

    lines = iter(["/frobnicate", "/reset", "Hi!", "/quit", "never read"])

    def read(prompt=""):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line
    monkeypatch.setattr("builtins.input", read)
    chat.converse(Session(), interactive=False)
    out = capsys.readouterr().out
    assert Session.calls == ["reset", "Hi!"]  # the unknown command is not a query; /quit ends the chat
    assert "unknown command /frobnicate" in out and "(memory reset)" in out and "rxt> ok" in out


def test_the_truncation_notice_counts_tokens_not_words(checkpoint, capsys):
    model, tok, _ = chat.load(dict(chat.DEFAULTS, ckpt=checkpoint))
    session = chat.Session(model, tok, dict(chat.DEFAULTS, max_new_tokens=8))
    session.answer("Mia has a red ball and a blue kite.", io.StringIO())
    assert "truncated" not in capsys.readouterr().err
    word = "qzx" * 200  # one word, hundreds of tokens
    assert len(tok.encode(word)) > model.cfg.seq_len
    session.answer(word, io.StringIO())
    session.wait()
    assert "truncated" in capsys.readouterr().err


def test_answers_up_to_half_the_context_are_allowed(checkpoint, monkeypatch, capsys):
    model, _, _ = chat.load(dict(chat.DEFAULTS, ckpt=checkpoint))
    half = model.cfg.seq_len // 2
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no input: the chat starts and ends at once
    assert chat.main([f"--ckpt={checkpoint}", f"--max_new_tokens={half}"]) is None
    with pytest.raises(chat.cli.ConfigError, match="max_new_tokens"):
        chat.main([f"--ckpt={checkpoint}", f"--max_new_tokens={half + 1}"])


def test_memory_report_gives_the_last_updates_change_relative_to_the_memory_before_it(checkpoint):
    model, tok, _ = chat.load(dict(chat.DEFAULTS, ckpt=checkpoint))
    session = chat.Session(model, tok, dict(chat.DEFAULTS, max_new_tokens=4))
    session.previous = torch.ones_like(session.stm)
    session.stm = 3 * torch.ones_like(session.stm)  # changed by 2, which is 200% of before (67% of after)
    assert session.memory_report().count("last update changed it by 200.0%") == model.cfg.n_layers
