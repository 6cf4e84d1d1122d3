"""Contracts of the runtime: generation (engine.py), the chat loop (chat.py), the command line (cli.py) and the demo's
stage chaining (demo.py) - each behaviour another module or a user relies on, pinned with a hand-computable value."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

import chat
import cli
import demo
import engine
import training
from conftest import TINY
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, get_config

BYTES = Tokenizer({bytes([i]): i for i in range(256)})  # byte-level: token i is byte i, then the specials


def tiny_model(seed=0, **options):
    with torch.random.fork_rng():  # seeded weights, the global RNG left as it was for the tests after this one
        torch.manual_seed(seed)
        return ReactiveTransformer(get_config("nano", vocab_size=BYTES.vocab_size, **dict(TINY, **options))).eval()


# -----------------------------------------------------------------------------
# engine.py: sampling


def test_top_k_and_top_p_keep_the_most_likely_tokens_wherever_they_sit_in_the_vocabulary():
    # probabilities (softmax) ~ [0.01, 0.09, 0.64, 0.03, 0.23]: the two most likely are ids 2 and 4, not 0 and 1
    logits = torch.tensor([[0.0, 2.0, 4.0, 1.0, 3.0]]).repeat(3000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(engine.sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 4}
    assert set(engine.sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {2, 4}  # 0.64 + 0.23 reaches 0.8
    assert set(engine.sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {2}
    assert set(engine.sample_next(logits, 1.0, top_k=3, top_p=0.99, generator=g).tolist()) == {1, 2, 4}  # both apply
    # off: top_k as large as the vocabulary (or larger), top_p 1.0 - every token can be drawn
    assert set(engine.sample_next(logits, 1.0, top_k=5, top_p=1.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    assert set(engine.sample_next(logits, 1.0, top_k=50, generator=g).tolist()) == {0, 1, 2, 3, 4}  # chat's 50, 5 ids
    kept = engine.sample_next(logits, 1.0, top_p=0.8, generator=g)
    share = (kept == 2).float().mean().item()  # renormalised over the kept two: 0.64 / 0.87 = 0.73
    assert abs(share - 0.7311) < 0.03
    greedy = engine.sample_next(torch.tensor([[0.0, 5.0, 1.0], [7.0, 0.0, 1.0]]), 0.0)
    assert greedy.tolist() == [1, 0]  # temperature 0: each row's argmax


def test_sampling_draws_from_the_generator_only():
    logits = torch.zeros(64, 50)
    draws = []
    for global_seed in (1, 2):
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)  # the global RNG must not matter
            draws.append(engine.sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(draws[0], draws[1])
    other = engine.sample_next(logits, 1.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(draws[0], other)


# -----------------------------------------------------------------------------
# engine.py: the KV cache


def test_kv_cache_appends_in_order_returns_everything_so_far_and_holds_exactly_max_len():
    cache = engine.KVCache(3)
    k1, v1 = torch.ones(1, 2, 2, 4), -torch.ones(1, 2, 2, 4)
    k2, v2 = torch.full((1, 2, 1, 4), 2.0, dtype=torch.float64), torch.full((1, 2, 1, 4), -2.0, dtype=torch.float64)
    k, v = cache.append(k1.double(), v1.double())
    assert k.shape == (1, 2, 2, 4) and cache.len == 2 and cache.kv.dtype == torch.float64  # the step's dtype
    k, v = cache.append(k2, v2)  # fills the cache exactly
    assert cache.len == 3 and cache.kv.shape == (2, 1, 2, 3, 4)
    assert k[0, 0, :, 0].tolist() == [1, 1, 2] and v[0, 0, :, 0].tolist() == [-1, -1, -2]
    with pytest.raises(AssertionError, match="overflow"):
        cache.append(k2, v2)


# -----------------------------------------------------------------------------
# engine.py: FastStep equals the full forward with every weight random (gains and biases too, not their init)


@pytest.mark.parametrize("options", [{}, dict(memory_rope=False, memory_qk_norm=True),
                                     dict(expert_bias=True, moe_out_bias=True, final_norm="layer"),
                                     dict(final_norm="none")])
@pytest.mark.parametrize("rows", [1, 2])
def test_the_fast_path_equals_the_full_forward_with_random_gains_and_biases(options, rows):
    """At init every RMSNorm gain is 1 and every bias 0, so a gain or bias FastStep left out would not show; here
    each parameter is moved at random first."""
    m, g = tiny_model(**options), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 256, (rows, 10), generator=g)
    with torch.no_grad():
        stm = torch.randn(TINY["n_layers"], rows, TINY["stm_size"], TINY["d_model"], generator=g)
        memory_kv = m.decoder.project_memory(stm)
        full, _ = m.decoder(m.embed(ids), memory_kv)
        caches = [engine.KVCache(10) for _ in m.decoder.layers]
        m.decoder(m.embed(ids[:, :4]), memory_kv, caches=caches)
        step = engine.FastStep(m.decoder, memory_kv, caches, start=4, max_new_tokens=6)
        fast = torch.stack([step(m.embed(ids[:, t]), t) for t in range(4, 10)], dim=1)
    torch.testing.assert_close(fast, full[:, 4:], atol=1e-3, rtol=1e-3)  # random weights: logits of ~10


# -----------------------------------------------------------------------------
# engine.py: interact and generate pass the sampling settings through


def test_interact_yields_ints_and_passes_top_k_top_p_and_the_generator_to_the_sampler():
    m = tiny_model()
    stm, query = m.new_memory(1, generator=torch.Generator().manual_seed(0)), [BYTES.bos_id, BYTES.q_id, 77, 78,
                                                                               BYTES.a_id]
    greedy = list(engine.interact(m, query, stm, temperature=0, max_new_tokens=6))
    assert len(greedy) == 6 and all(type(t) is int for t in greedy)
    # at temperature 1, keeping one token (top_k=1, or top_p below the top token's mass) is greedy
    assert list(engine.interact(m, query, stm, temperature=1.0, top_k=1, max_new_tokens=6)) == greedy
    assert list(engine.interact(m, query, stm, temperature=1.0, top_p=1e-6, max_new_tokens=6)) == greedy
    draws = []
    for global_seed in (1, 2):  # the same generator seed draws the same answer whatever the global RNG
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)
            draws.append(list(engine.interact(m, query, stm, temperature=2.0, max_new_tokens=8,
                                              generator=torch.Generator().manual_seed(3))))
    assert draws[0] == draws[1] and draws[0] != greedy[:8]
    tokens, lengths = engine.generate(m, torch.tensor([query]), stm=stm, temperature=2.0, max_new_tokens=8,
                                      generator=torch.Generator().manual_seed(3))
    assert tokens[0].tolist() == draws[0] and lengths.tolist() == [8]  # no [EOS] asked for: every token counts


def test_a_stream_stops_at_the_step_every_row_has_said_eos_and_not_before():
    m = tiny_model()
    query = lambda c: [BYTES.bos_id, BYTES.q_id, c, BYTES.a_id]
    stm = m.new_memory(1, generator=torch.Generator().manual_seed(0)).repeat(1, 2, 1, 1)  # both rows one memory
    memory_kv = m.decoder.project_memory(stm)

    def run(prompts, eos):  # (B, steps) greedy tokens
        return torch.stack(list(engine.stream(m.decoder, m.embed, torch.tensor(prompts), None, memory_kv,
                                              temperature=0, max_new_tokens=12, eos_id=eos)), 1)
    free = run([query(77), query(77)], None)
    eos = free[0, 2].item()
    first = (free[0] == eos).nonzero()[0].item()  # both rows say it first at this step (2 or before)
    assert torch.equal(run([query(77), query(77)], eos), free[:, :first + 1])
    other = run([query(77), query(90)], None)[1]
    assert not (other == eos).any()  # this row never says it: the stream goes on to max_new_tokens for it
    assert run([query(77), query(90)], eos).shape == (2, 12)


# -----------------------------------------------------------------------------
# chat.py: the session


def session_of(**cfg):
    return chat.Session(tiny_model(), BYTES, dict(chat.DEFAULTS, **cfg))


def test_chat_defaults_are_greedy_with_no_filters_and_a_seeded_generator():
    assert chat.DEFAULTS["temperature"] == 0 and chat.DEFAULTS["top_k"] == 0 and chat.DEFAULTS["top_p"] == 1.0
    assert chat.DEFAULTS["ckpt"] == "out/nano/mrl/ckpt.pt" and chat.DEFAULTS["device"] == "cpu"
    # plain `python chat.py` on the demo's nano model: the answer budget fits half its 128-token interactions
    assert 0 < chat.DEFAULTS["max_new_tokens"] <= get_config("nano").seq_len // 2
    a, b, c = session_of(seed=5), session_of(seed=5), session_of(seed=6)
    assert torch.equal(a.stm, b.stm) and not torch.equal(a.stm, c.stm)  # the first memory comes from the seed
    assert a.stm.shape == (TINY["n_layers"], 1, TINY["stm_size"], TINY["d_model"])
    hot = [session_of(seed=5, temperature=2.0, max_new_tokens=8) for _ in range(2)]
    answers = [s.answer("Mia has a red ball.", io.StringIO()) for s in hot]
    assert answers[0] == answers[1]  # and so do the sampled answers
    for s in hot:
        s.wait()


def test_an_answer_passes_its_settings_to_the_engine_and_writes_query_answer_eos(monkeypatch):
    session = session_of(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8, seed=3)
    calls, writes = [], []

    def interact(model, query_ids, stm, **kw):
        calls.append((query_ids, stm, kw))
        yield from (104, 105)  # "hi"
    monkeypatch.setattr(engine, "interact", interact)
    monkeypatch.setattr(session.model, "update_memory", lambda stm, ids: writes.append((stm, ids)) or stm + 1)
    first = session.stm
    assert session.answer("ab", io.StringIO()) == "hi"
    session.wait()
    query_ids, stm, kw = calls[0]
    assert query_ids == [BYTES.bos_id, BYTES.q_id, 97, 98, BYTES.a_id] and stm is first
    assert kw == dict(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8, eos_id=BYTES.eos_id,
                      generator=session.generator)
    assert writes[0][0] is first and writes[0][1].tolist() == [query_ids + [104, 105, BYTES.eos_id]]
    assert session.previous is first and torch.equal(session.stm, first + 1)


def test_streamed_output_is_whole_characters_and_the_returned_answer_is_the_same_text(monkeypatch):
    session = session_of(max_new_tokens=16)
    said = list("hé🙂".encode()) + ["é".encode()[0]]  # ends in half a character
    monkeypatch.setattr(engine, "interact", lambda *a, **kw: iter(said))
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)
    out = Out()
    answer = session.answer("x", out)
    session.wait()
    assert out.getvalue() == "hé🙂\ufffd" == answer  # the cut character is one replacement mark, at the end
    assert "\ufffd" not in "".join(writes[:-1])  # no half character was ever printed while streaming


def test_a_long_input_keeps_its_last_tokens_leaving_room_for_the_answer_and_says_how_many(monkeypatch, capsys):
    session = session_of(max_new_tokens=8)
    seen = []
    monkeypatch.setattr(engine, "interact", lambda m, q, stm, **kw: seen.append(q) or iter([]))
    session.answer("a" * 90 + "bcd", io.StringIO())
    session.wait()
    # prompt + answer + [EOS] fit the 64-token interaction: 64 - 8 - 1 = 55 = [BOS][Q] + 52 tokens + [A]
    assert len(seen[0]) == 55 and seen[0][-4:] == [98, 99, 100, BYTES.a_id]
    assert "(input is 93 tokens; truncated to its last 52)" in capsys.readouterr().err


def test_memory_report_gives_each_layers_mean_slot_norm_and_its_own_change():
    session = session_of()
    D = TINY["d_model"]
    session.stm = torch.stack([torch.ones(1, 16, D), 2 * torch.ones(1, 16, D)])  # slot norms sqrt(32), 2 sqrt(32)
    report = session.memory_report()
    assert report.splitlines() == ["  layer 0: mean slot norm 5.657", "  layer 1: mean slot norm 11.314"]  # no change
    session.previous = session.stm  # yet: nothing was written
    session.stm = torch.stack([3 * torch.ones(1, 16, D), 2 * torch.ones(1, 16, D)])
    lines = session.memory_report().splitlines()
    assert lines == ["  layer 0: mean slot norm 16.971, last update changed it by 200.0%",
                     "  layer 1: mean slot norm 11.314, last update changed it by 0.0%"]
    session.reset()
    assert session.previous is None and "changed" not in session.memory_report()


# -----------------------------------------------------------------------------
# chat.py: the loop and main


class FakeSession:
    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.append("reset")

    def memory_report(self):
        return "REPORT"

    def answer(self, query, out):
        self.calls.append(query)
        out.write("ok")

    def wait(self):
        self.calls.append("wait")


def feed(monkeypatch, lines, prompts=None):
    """input() reads these lines, then EOF (or raises the exception given as a line); prompts collects its prompts."""
    it = iter(lines)

    def read(prompt=""):
        if prompts is not None:
            prompts.append(prompt)
        line = next(it, EOFError)
        if isinstance(line, type) and issubclass(line, BaseException):
            raise line
        return line
    monkeypatch.setattr("builtins.input", read)


def test_converse_strips_input_and_exit_help_and_memory_are_commands(monkeypatch, capsys):
    session, prompts = FakeSession(), []
    feed(monkeypatch, ["  Hi there  ", "   ", "/help", "/memory", " /exit ", "never read"], prompts)
    chat.converse(session, interactive=False)
    out = capsys.readouterr().out
    assert session.calls == ["Hi there"]  # stripped; the blank line ignored; /exit ended it
    assert out == f"you> Hi there\nrxt> ok\n{chat.HELP}\nREPORT\n"
    assert set(prompts) == {""}  # a pipe gets no prompt, the query is echoed instead
    session, prompts = FakeSession(), []
    feed(monkeypatch, ["Hi", "/quit"], prompts)
    chat.converse(session, interactive=True)
    assert capsys.readouterr().out == "rxt> ok\n" and prompts == ["you> ", "you> "]  # a terminal: prompt, no echo


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("runtime") / "ckpt.pt")
    training.save_checkpoint(path, tiny_model(), stage="mrl", step=0, cfg={}, tokenizer=BYTES)
    return path


def test_chat_main_greets_a_terminal_ends_cleanly_on_ctrl_c_and_waits_for_the_last_write(ckpt, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stdin", Terminal())
    waited, real_wait = [], chat.Session.wait
    monkeypatch.setattr(chat.Session, "wait", lambda self: waited.append(1) or real_wait(self))
    feed(monkeypatch, ["Hi", KeyboardInterrupt])
    assert cli.run(chat.main, [f"--ckpt={ckpt}", "--max_new_tokens=4"]) is None  # no exit 130: Ctrl-C ends the chat
    out = capsys.readouterr().out
    assert out.startswith(f"nanoRxT chat - {ckpt} (stage mrl). {chat.HELP}\n") and out.endswith("\n\n")
    assert len(waited) >= 3  # reset, the answer, and main's last wait for the write in flight
    monkeypatch.setattr("sys.stdin", io.StringIO())  # a pipe: no greeting
    feed(monkeypatch, [])
    assert cli.run(chat.main, [f"--ckpt={ckpt}", "--max_new_tokens=4"]) is None
    assert capsys.readouterr().out == ""


def test_chat_flags_take_the_documented_ranges(ckpt, monkeypatch, capsys):
    feed(monkeypatch, [])
    monkeypatch.setattr("sys.stdin", io.StringIO())
    for ok in (["--temperature=0", "--top_k=0", "--top_p=0.01", "--seed=0", "--max_new_tokens=1"],
               ["--temperature=1.5", "--top_k=1", "--top_p=1.0", "--max_new_tokens=32", "--device=cpu"]):
        assert cli.run(chat.main, [f"--ckpt={ckpt}", *ok]) is None, ok
    for bad, key in (("--top_p=0.005", "top_p"), ("--top_p=0", "top_p"), ("--seed=-1", "seed"),
                     ("--max_new_tokens=0", "max_new_tokens"), ("--top_k=True", "top_k"),
                     ("--device=cuda:7", "device"), ("--max_new_tokens=33", "max_new_tokens")):
        with pytest.raises(SystemExit) as e:
            cli.run(chat.main, [f"--ckpt={ckpt}", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and key in err, (bad, err)


# -----------------------------------------------------------------------------
# cli.py: run


def test_run_returns_mains_result_reads_sys_argv_and_turns_ctrl_c_into_exit_130(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["script.py", "--a=1", "b"])
    assert cli.run(lambda argv: ("got", argv)) == ("got", ["--a=1", "b"])  # argv None: the command line's
    assert cli.run(lambda argv: argv, ["--x=2"]) == ["--x=2"]
    assert cli.run(lambda argv: argv, []) == []  # an explicit empty list is no flags, not the command line's

    def interrupted(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(interrupted, [])
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    for error, code in ((cli.ConfigError("bad flag"), 2), (cli.CheckpointError("bad file"), 1),
                        (cli.UserError("no data"), 1)):
        def fails(argv, error=error):
            raise error
        with pytest.raises(SystemExit) as e:
            cli.run(fails, [])
        captured = capsys.readouterr()
        assert e.value.code == code and captured.err == f"error: {error}\n" and captured.out == ""
    with pytest.raises(ValueError):  # a bug is not a user error: its traceback is kept
        cli.run(lambda argv: int("x"), [])


# -----------------------------------------------------------------------------
# cli.py: configure


def test_configure_applies_files_then_flags_in_the_order_given(tmp_path):
    defaults = dict(lr=1e-3, max_iters=100, out_dir="out/run", init_from=None, resume=True, model_args={})
    conf = tmp_path / "conf.py"
    conf.write_text("_helper = 3\nlr = 2e-3\nmax_iters = _helper * 10\nout_dir = 'out/a'\n")
    cfg = cli.configure(defaults, ["--max_iters=7", str(conf), "--out_dir=out/b=c", "--resume=False",
                                   "--model_args={'stm_size': 8}"])
    assert cfg == dict(lr=2e-3, max_iters=30, out_dir="out/b=c", init_from=None, resume=False,
                       model_args={"stm_size": 8})  # the file overrode the flag before it; "=" kept in a value
    assert defaults["lr"] == 1e-3  # the defaults themselves are untouched
    lr = cli.configure(defaults, ["--lr=1"])["lr"]
    assert lr == 1.0 and type(lr) is float  # an int becomes the float setting it sets
    # a setting whose default is None takes any type, and any setting can be set to None
    assert cli.configure(defaults, ["--init_from=out/x.pt"])["init_from"] == "out/x.pt"
    assert cli.configure(defaults, ["--max_iters=None"])["max_iters"] is None
    for argv, words in ((["--max_iters=1.5"], ["max_iters", "must be int", "float 1.5"]),
                        (["--out_dir=3"], ["out_dir", "must be str"]),
                        (["--resume=1"], ["resume", "must be bool"]),
                        (["--lr_decay=1"], ["unknown config key 'lr_decay'", "known keys: init_from, lr, max_iters"]),
                        ([str(tmp_path / "nope.py")], ["config file not found"]),
                        (["--lr"], ["expected --key=value"])):
        with pytest.raises(cli.ConfigError) as e:
            cli.configure(defaults, argv)
        assert all(w in str(e.value) for w in words), (argv, str(e.value))
    (tmp_path / "typo.py").write_text("max_iter = 5\n")
    with pytest.raises(cli.ConfigError, match="'max_iter'.*typo.py"):  # a file's unknown key names the file
        cli.configure(defaults, [str(tmp_path / "typo.py")])


# -----------------------------------------------------------------------------
# cli.py: check and its rules


def test_check_names_the_first_bad_key_its_value_and_the_rule():
    cfg = dict(a=0, b=-1, c="x")
    with pytest.raises(cli.ConfigError) as e:
        cli.check(cfg, a=cli.at_least(0), b=cli.at_least(0), c=cli.POSITIVE)
    assert str(e.value) == "b=-1: must be a number >= 0"
    with pytest.raises(cli.ConfigError) as e:
        cli.check(dict(p=1.5), p=cli.between(0.01, 1))
    assert str(e.value) == "p=1.5: must be between 0.01 and 1"
    with pytest.raises(cli.ConfigError) as e:
        cli.check(dict(c="x"), c=cli.POSITIVE)
    assert str(e.value) == "c='x': must be > 0"
    cli.check(cfg, a=cli.at_least(0))  # a good value passes silently


@pytest.mark.parametrize("rule, good, bad", [
    (cli.at_least(1), [1, 1.5, 100], [0, 0.99, True, "3", None]),  # True == 1, yet not a number
    (cli.between(0.5, 1), [0.5, 0.75, 1], [0.49, 1.01, True, False]),
    (cli.POSITIVE, [1e-9, 3], [0, -1, True, "1"]),
    (cli.DISTANCES, [[1], [1, 2, 8]], [[], [1, 0], [1.0], [1, "2"], (1, 2), 1, None]),
    (cli.CURRICULUM, [[[1]], [[1], [1, 2]]], [[], [[]], [[1], []], [1, 2], [[1], [-1]], ([1],)]),
])
def test_each_rule_accepts_its_range_and_refuses_bools_strings_and_the_wrong_container(rule, good, bad):
    for v in good:
        cli.check(dict(k=v), k=rule)
    for v in bad:
        with pytest.raises(cli.ConfigError):
            cli.check(dict(k=v), k=rule)


def test_check_device_knows_cpu_auto_and_only_the_cuda_devices_this_machine_has(monkeypatch):
    for name in ("cpu", "auto"):
        cli.check_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("cuda", "cuda:0", "cuda:1"):
        cli.check_device(name)
    for name, words in (("cuda:2", "2 CUDA device(s)"), ("cuda:x", "2 CUDA device(s)"), ("cuda:-1", "CUDA"),
                        ("gpu", "must be auto, cpu, cuda, cuda:N or mps"), ("CPU", "must be")):
        with pytest.raises(cli.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            cli.check_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(cli.ConfigError, match="0 CUDA device"):
        cli.check_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(cli.ConfigError):
        cli.check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    cli.check_device("mps")


def test_require_files_names_every_missing_file_and_how_to_make_it(tmp_path):
    (tmp_path / "have.bin").write_text("x")
    cli.require_files(str(tmp_path), ["have.bin"])
    with pytest.raises(cli.UserError) as e:
        cli.require_files(str(tmp_path), ["a.bin", "have.bin", "b.jsonl"], hint="run make")
    assert str(e.value) == f"a.bin, b.jsonl not found in {tmp_path} (run make)"
    assert not isinstance(e.value, cli.ConfigError)
    with pytest.raises(cli.UserError, match="python -m data.memory_world"):  # the default hint builds the world
        cli.require_files(str(tmp_path), ["x"])
    (tmp_path / "dir.bin").mkdir()  # a folder of that name is not the file
    with pytest.raises(cli.UserError, match="dir.bin"):
        cli.require_files(str(tmp_path), ["dir.bin"])


# -----------------------------------------------------------------------------
# cli.py: progress in a log file


def test_progress_lines_carry_the_postfix_count_updates_of_n_and_nothing_when_disabled(capsys):
    bar = cli.progress(total=20, desc="train")
    bar.set_postfix(loss="1.5", lr="3e-4")
    bar.update(3)  # a tenth is 2 steps: 3 passes the first mark
    bar.update(1)
    bar.write("a line of its own")
    bar.update(16)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["train: 3/20", "train: 4/20", "a line of its own",
                                                       "train: 20/20"]
    assert lines[0].endswith("s)  loss 1.5  lr 3e-4")
    with cli.progress(range(30), desc="quiet", disable=True) as quiet:
        assert list(quiet) == list(range(30))  # disabled: every item, no line
    for _ in cli.progress(iter(range(30)), desc="no total"):  # no length, no total: no line either
        pass
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# demo.py: the stages, main's chaining and flags, the report card


def test_demo_stages_are_the_documented_commands_with_the_flags_on_training_stages_only():
    py, extra = sys.executable, ["--device=cpu", "--compile=False"]
    want = [("world", [py, "-m", "data.memory_world", "--out_dir", "data/cache/world"]),
            ("mlm", [py, "train_mlm.py", "config/nano_mlm.py", *extra]),
            ("joint", [py, "train_joint.py", "config/nano_joint.py", *extra]),
            ("sft", [py, "train_joint.py", "config/nano_sft.py", *extra]),
            ("memory stages", [py, "train_mrl.py", "config/nano_mrl.py", "--phases=smat,mrl", *extra]),
            ("eval", [py, "evaluate.py", "--ckpt=out/nano/mrl/ckpt.pt", "--out=out/nano/eval.json"])]
    assert demo.stages(extra, False) == want
    stateless = [("baseline lm", [py, "train_baseline.py", "config/nano_baseline_lm.py", *extra]),
                 ("baseline", [py, "train_baseline.py", "config/nano_baseline.py", *extra]),
                 ("baseline eval", [py, "evaluate.py", "--ckpt=out/nano/baseline/ckpt.pt",
                                    "--out=out/nano/baseline/eval.json"])]
    assert demo.stages(extra, True) == want + stateless
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _, cmd in want + stateless:  # every config a stage names is there
        assert all(os.path.isfile(os.path.join(root, a)) for a in cmd if a.startswith("config/")), cmd


@pytest.fixture()
def demo_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []

    def run(cmd):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 3 if "chat.py" in cmd else 0)
    monkeypatch.setattr(demo.subprocess, "run", run)
    reports = []
    monkeypatch.setattr(demo, "report", lambda wall, final="mrl": reports.append((wall, final)) or "REPORT")
    return ran, reports


def test_demo_main_runs_every_stage_with_the_flags_then_chats_with_the_final_checkpoint(demo_dir, capsys):
    ran, reports = demo_dir
    assert demo.main(["--dmpo", "--baseline", "--dtype=float32", "--device=cpu"]) == 3  # chat's exit code
    names = [name for name, _ in demo.stages([], True)]
    assert len(ran) == len(names) + 1 and os.path.isdir("out/nano")
    assert ran[1][-2:] == ["--dtype=float32", "--device=cpu"] and "--phases=smat,dmpo" in ran[4]
    assert ran[-1] == [sys.executable, "chat.py", "--ckpt=out/nano/dmpo/ckpt.pt"]
    wall, final = reports[0]
    assert final == "dmpo" and list(wall) == names and all(0 <= t < 60 for t in wall.values())  # seconds each
    assert "REPORT" in capsys.readouterr().out
    ran.clear()
    assert demo.main(["--no-chat"]) == 0
    assert len(ran) == 6 and not any("chat.py" in cmd for cmd in ran)  # no baseline, no chat
    assert "--phases=smat,mrl" in ran[4] and reports[-1][1] == "mrl"


def fake_checkpoints(monkeypatch, ckpts):
    for path in ckpts:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    monkeypatch.setattr(demo.training, "load_checkpoint", lambda path: ckpts[path])


def test_demo_report_card_shows_each_finished_stage_and_the_eval_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_checkpoints(monkeypatch, {
        "out/nano/mlm/ckpt.pt": dict(step=10, metrics=dict(loss=2.34567, tokens=999, seconds=12.4)),
        "out/nano/smat/ckpt.pt": dict(step=20, metrics=dict(loss=1.5, acc=0.25)),
        "out/nano/dmpo/ckpt.pt": dict(step=30, metrics=dict(seconds=99.6))})
    plotted = []
    monkeypatch.setattr(demo, "plot", plotted.append)
    monkeypatch.setattr(demo, "format_table", lambda results: f"TABLE of {sorted(results)}")
    text = demo.report({"world": 1.2, "mlm": 60.5}, final="dmpo")
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| stage")]
    assert rows == ["| mlm | 10 | 12 | loss 2.346 |", "| smat | 20 | 0 | loss 1.5, acc 0.25 |", "| dmpo | 30 | 100 |  |"]
    assert "The model evaluated is the last stage's: dmpo (out/nano/dmpo/ckpt.pt)." in text
    assert "Wall time per demo step (this run, s): world 1, mlm 60" in lines  # 60.5 rounds to even
    assert "## Memory" not in text and plotted == [] and open("out/nano/report.md").read() == text
    results = {"recall": {"1": {"recall": 0.5}}, "binding": {}}
    with open("out/nano/eval.json", "w") as f:
        json.dump({"results": results}, f)
    text = demo.report({}, final="dmpo")
    assert "```\nTABLE of ['binding', 'recall']\n```" in text and plotted == [results["recall"]]
    assert "RxT vs a stateless LLM" not in text  # no baseline evaluated
    assert sorted(os.listdir("out/nano")) == ["dmpo", "eval.json", "mlm", "report.md", "smat"]  # no .tmp left


def test_demo_comparison_puts_each_shared_row_of_rxt_and_the_baseline_side_by_side(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_checkpoints(monkeypatch, {
        "out/nano/mlm/ckpt.pt": dict(step=1, metrics=dict(seconds=10.0)),
        "out/nano/smat/ckpt.pt": dict(step=1, metrics=dict(seconds=5.0)),
        "out/nano/mrl/ckpt.pt": dict(step=1, metrics=dict(seconds=2.4), model=dict(a=torch.zeros(3, 4),
                                                                                   b=torch.zeros(1000))),
        "out/nano/baseline_lm/ckpt.pt": dict(step=1, metrics=dict(seconds=7.0)),
        "out/nano/baseline/ckpt.pt": dict(step=1, metrics=dict(seconds=1.0), model=dict(a=torch.zeros(5)))})
    rxt = {"recall": {"1": {"recall": 0.5}, "2": None, "4": {"recall": 0.25}}, "binding": {"1": {"recall": 0.125}},
           "span_kept": {"told": 3, "asked": 2}, "in_context": {"recall": 0.9},
           "answer_tokens": {"ppl": 1.23456, "acc": 0.8}}
    base = {"recall": {"1": {"recall": 0.2}, "2": {"recall": 0.3}}, "binding": {"1": {"recall": 0.0625}},
            "span_kept": {"told": 1}, "in_context": {"recall": 0.95}, "answer_tokens": {"ppl": 2.5, "acc": 0.5}}
    table = demo.comparison(rxt, base, final="mrl").splitlines()
    assert table[:4] == ["## RxT vs a stateless LLM on the same conversations", "", "| | RxT | stateless |",
                         "|---|---|---|"]
    assert table[4:] == ["| recall, d=1 | 50.0% | 20.0% |",  # d=2: RxT has none; d=4: the baseline has none
                         "| binding, d=1 | 12.5% | 6.2% |",
                         "| span (told): facts kept at 90% | 3 | 1 |",
                         "| in-context | 90.0% | 95.0% |",
                         "| answer perplexity | 1.235 | 2.500 |",
                         "| answer accuracy | 80.0% | 50.0% |",
                         "| parameters | 1,012 | 5 |",
                         "| training time (s) | 17 | 8 |"]  # 10 + 5 + 2.4 (no joint, sft, mem) and 7 + 1
