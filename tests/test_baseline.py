"""The stateless baseline (train_baseline.py): it trains on the same world and is evaluated on the same episodes as
RxT, re-reading the conversation instead of remembering it."""

import math
import os

import torch

import evaluate
import train_baseline
import training
from conftest import TINY, tiny_flags
from data.loaders import render_dialogue


def test_the_baseline_trains_and_is_evaluated_on_the_same_episodes(world, tmp_path):
    model_args = dict(TINY, seq_len=256)
    lm = train_baseline.main(tiny_flags(data_dir=world, out_dir=str(tmp_path / "lm"), model_args=model_args,
                                        max_iters=40, eval_interval=40, lr=3e-3))
    dialogue = train_baseline.main(tiny_flags(data_dir=world, out_dir=str(tmp_path / "dlg"), dialogue=True,
                                              init_from=str(tmp_path / "lm/ckpt.pt"), seq_len=256, max_iters=40,
                                              eval_interval=40, lr=3e-3, distances=[1, 2]))
    ckpt = training.load_checkpoint(str(tmp_path / "dlg/ckpt.pt"))
    assert ckpt["model_kind"] == "StatelessDecoder" and ckpt["stage"] == "baseline"
    assert lm["ar_loss"] < 0.8 * math.log(ckpt["model_config"]["vocab_size"]) and math.isfinite(dialogue["ar_loss"])
    results = evaluate.main([f"--ckpt={tmp_path / 'dlg/ckpt.pt'}", f"--data_dir={world}", "--distances=[1,2]",
                             "--n_per_distance=10", "--max_answer=4", "--max_turn_answer=8", "--device=cpu"])
    assert all(0 <= r["recall"] <= 1 and 0 <= r["reset_control"] <= 1 for r in results["recall"].values())
    assert results["chat_flow"] and results["in_context"]["n"] > 0 and math.isfinite(results["answer_tokens"]["ppl"])


def test_a_conversation_too_long_for_the_context_loses_its_oldest_turns_whole(world):
    from data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    turns = [{"query": f"Turn {i} says hello to everyone here.", "answer": "Hello!"} for i in range(10)]
    ids, answer = render_dialogue(tok, turns, 60, query="Who are you?")
    text = tok.decode(ids)
    assert len(ids) <= 60 and text.startswith("[BOS][Q]") and text.endswith("Who are you?[A]")
    assert "Turn 9" in text and "Turn 0" not in text and len(answer) == len(ids)


def test_the_baseline_learns_each_next_token(world, tmp_path, monkeypatch):
    from conftest import tiny_flags
    from model import StatelessDecoder
    seen, real = [], StatelessDecoder.forward
    monkeypatch.setattr(StatelessDecoder, "forward", lambda self, ids, targets=None: seen.append((ids, targets)) or real(
        self, ids, targets))
    train_baseline.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), max_iters=1, eval_iters=1, eval_interval=1))
    ids, targets = seen[0]
    assert torch.equal(targets[:, :-1], ids[:, 1:]) and (targets[:, -1] == -100).all()
