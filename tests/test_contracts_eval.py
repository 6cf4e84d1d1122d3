"""Contracts of the evaluation (evaluate.py), the benchmark (bench.py) and the batches (data/loaders.py) that the
other tests leave implicit: exact layouts and boundaries, what each option turns on or off, which numbers each
report line and ratio is made of. A one-byte-per-token tokenizer and tiny models keep every expected value countable
by hand; the slow parts (generation, timers, whole benchmark sections) are replaced by recorders where only the
arithmetic around them is under test."""

import argparse
import contextlib
import json
import statistics

import numpy as np
import pytest
import torch

import bench
import cli
import evaluate
import model as M
import training
from conftest import TINY
from data.loaders import (IGNORE, collate_dialogues, collate_interactions, collate_queries, episode_pools,
                          episode_tensors, get_lm_batch, join_answers, length_chunks, mlm_inputs, pad_rows,
                          rejected_answer, render_dialogue, render_interaction, render_query)
from data.memory_world import SLOTS
from data.tokenizer import Tokenizer

BYTES = Tokenizer({bytes([i]): i for i in range(256)})  # one token per byte: every length below is a count of chars
BOS, Q, A, EOS, PAD = BYTES.bos_id, BYTES.q_id, BYTES.a_id, BYTES.eos_id, BYTES.pad_id


def b(text):
    return list(text.encode())


# -----------------------------------------------------------------------------
# data/loaders.py


def test_lm_batch_reads_unsigned_16_bit_windows_and_needs_one_token_more_than_a_window(tmp_path):
    path = str(tmp_path / "x.bin")
    np.array([65535, 40000, 7, 9], dtype=np.uint16).tofile(path)  # ids above 32767: a signed read turns them negative
    x = get_lm_batch(path, 200, 2, generator=torch.Generator().manual_seed(0))
    # a window starts anywhere but at the very last window (as nanoGPT's x, which has a y one token further)
    assert {tuple(r) for r in x.tolist()} == {(65535, 40000), (40000, 7)}
    one = get_lm_batch(path, 5, 3, generator=torch.Generator().manual_seed(0))  # 4 tokens = seq_len + 1: one window
    assert one.tolist() == [[65535, 40000, 7]] * 5
    with pytest.raises(ValueError, match=r"holds 4 tokens, fewer than seq_len \+ 1 = 5"):
        get_lm_batch(path, 1, 4)


def test_mlm_inputs_choose_nothing_in_an_all_padding_row_and_leave_the_input_untouched():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    keep = ids.clone()
    # prob 0 draws nothing: a row with a real token still gets its first one; the all-padding row gets none
    masked, targets = mlm_inputs(ids, mask, 99, 0.0, torch.Generator().manual_seed(0))
    assert masked.tolist() == [[99, 6, 7], [8, 9, 10]]
    assert targets.tolist() == [[5, IGNORE, IGNORE], [IGNORE] * 3]
    masked, targets = mlm_inputs(ids, mask, 99, 1.0, torch.Generator().manual_seed(0))  # prob 1: every real token
    assert masked.tolist() == [[99, 99, 7], [8, 9, 10]] and targets.tolist() == [[5, 6, IGNORE], [IGNORE] * 3]
    assert torch.equal(ids, keep)


def test_prompts_keep_a_query_that_fits_whole_and_cut_exactly_what_does_not():
    q = "abcdefghij"  # 10 tokens; a prompt adds [BOS][Q] ... [A]
    whole = [BOS, Q] + b(q) + [A]
    assert render_query(BYTES, q, 13) == whole and render_query(BYTES, q, 20) == whole  # fits: nothing is cut
    assert render_query(BYTES, q, 12) == [BOS, Q] + b("bcdefghij") + [A]  # one too long: the first token goes
    # an interaction that fits exactly keeps everything; the answer starts right after [A]
    assert render_interaction(BYTES, q, "xyz", 17) == (whole + b("xyz") + [EOS], 13)
    assert render_interaction(BYTES, q, "xyz", 16) == ([BOS, Q] + b("bcdefghij") + [A] + b("xyz") + [EOS], 12)
    # an answer that cannot fit: the query is gone, the answer cut, no [EOS]; the answer still starts after [A]
    assert render_interaction(BYTES, "abc", "x" * 20, 10) == ([BOS, Q, A] + b("x" * 7), 3)


TURN1, TURN2 = {"query": "ab", "answer": "c"}, {"query": "d", "answer": "ef"}
ROW1, ROW2 = [BOS, Q] + b("ab") + [A] + b("c") + [EOS], [BOS, Q] + b("d") + [A] + b("ef") + [EOS]  # 7 tokens each
FLAGS1, FLAGS2 = [False] * 5 + [True] * 2, [False] * 4 + [True] * 3  # the answer and its [EOS]


def test_a_dialogue_that_fits_exactly_keeps_every_turn_and_its_question_is_no_answer():
    assert render_dialogue(BYTES, [TURN1, TURN2], 14) == (ROW1 + ROW2, FLAGS1 + FLAGS2)
    assert render_dialogue(BYTES, [TURN1, TURN2], 13) == (ROW2, FLAGS2)  # one token over: the oldest turn goes
    prompt = [BOS, Q] + b("g") + [A]
    assert render_dialogue(BYTES, [TURN1, TURN2], 18, query="g") == (ROW1 + ROW2 + prompt, FLAGS1 + FLAGS2 + [False] * 4)
    assert render_dialogue(BYTES, [TURN1, TURN2], 17, query="g") == (ROW2 + prompt, FLAGS2 + [False] * 4)
    # even when nothing else fits, the question itself stays
    assert render_dialogue(BYTES, [TURN1, TURN2], 5, query="g") == (prompt, [False] * 4)


def test_dialogue_batches_target_the_answer_tokens_of_every_turn_and_nothing_else():
    long = {"query": "ab", "answer": "c", "interactions": [TURN2]}  # 14 tokens
    short = {"query": "d", "answer": "ef", "interactions": []}  # 7 tokens
    ids, attn_mask, targets = collate_dialogues(BYTES, [long, short], 64)
    assert ids.tolist() == [ROW1 + ROW2, ROW2 + [PAD] * 7] and attn_mask.sum(dim=1).tolist() == [14, 7]
    want = [IGNORE] * 14
    want[4:6], want[10:13] = b("c") + [EOS], b("ef") + [EOS]  # [A] predicts the first answer token
    assert targets[0].tolist() == want
    assert targets[1].tolist() == [IGNORE] * 3 + b("ef") + [EOS] + [IGNORE] * 8


def test_an_empty_sampled_answer_gets_its_eos_and_marks_nothing_as_sampled():
    q_ids, q_mask = collate_queries(BYTES, ["ab", "d"], 32, 4)
    ans = torch.tensor([[EOS, 0], [7, 8]])
    ids, attn_mask, ans_mask = join_answers(q_ids, q_mask, ans, torch.tensor([0, 2]), BYTES)
    assert ids[0][attn_mask[0]].tolist() == [BOS, Q] + b("ab") + [A, EOS] and not ans_mask[0].any()
    assert ids[1][attn_mask[1]].tolist() == [BOS, Q] + b("d") + [A, 7, 8, EOS]
    assert ans_mask[1].nonzero().flatten().tolist() == [3, 4]  # [A] and 7 predict the two sampled tokens


def test_length_chunks_split_only_when_a_group_saves_more_than_128_positions():
    rows = lambda *lengths: pad_rows([[1] * n for n in lengths], 0)[1]
    # rows of 139 and 10: a second group saves 129 padded positions, more than its overhead of 128: two groups,
    # each cut to its own length
    assert sorted((n, r.tolist()) for r, n in length_chunks(rows(139, 10))) == [(10, [1]), (139, [0])]
    assert length_chunks(rows(138, 10)) is None  # saves exactly 128: the tie stays one group
    # equal rows in a batch padded wider than them (pad_to): one group, but not the whole padded batch
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :5] = True
    assert [(r.tolist(), n) for r, n in length_chunks(mask)] == [([0, 1, 2], 5)]


def test_episode_tensors_never_cut_a_turn_to_pad_to():
    eps = [{"query": "abcdef", "answer": "g", "interactions": [{"query": "h", "answer": "ij"}]}]
    plain = episode_tensors(BYTES, eps, 32, "cpu")
    for got, want in zip(episode_tensors(BYTES, eps, 32, "cpu", pad_to=4), plain):  # pad_to below the width
        assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_rejected_answers_work_for_episodes_written_before_rivals_were_recorded():
    g = torch.Generator().manual_seed(0)
    old = {"gold": "red"}  # no "rivals" key at all
    draws = [rejected_answer(old, {"binding": 1.0, "own": 0.0}, ["red", "blue"], g) for _ in range(5)]
    assert draws == [("other", "blue")] * 5


def test_length_sorted_pools_sort_by_each_episodes_longest_turn_including_the_first():
    turn = lambda n: {"query": "q" * (n - 1), "answer": "a"}  # a turn of n characters
    ep = lambda name, first, *rest: dict(turn(first), name=name, distance=1, interactions=[turn(n) for n in rest])
    # longest turns 12, 10, 6; their sums 16, 18, 18; the interactions alone 2, 10, 6
    a, b_, c = ep("a", 12, 2, 2), ep("b", 3, 10, 5), ep("c", 6, 6, 6)
    val = [ep("v1", 9, 1), ep("v2", 2, 1)]
    pools = episode_pools(val + [a, b_, c], n_val=2, by_length=True)
    assert [e["name"] for e in pools["train"][1]] == ["c", "b", "a"]
    assert [e["name"] for e in pools["val"][1]] == ["v2", "v1"]  # the validation pool is sorted too
    assert [e["name"] for e in episode_pools(val + [a, b_, c], n_val=2)["train"][1]] == ["a", "b", "c"]


# -----------------------------------------------------------------------------
# evaluate.py


def tiny_rxt():
    torch.manual_seed(0)
    return M.ReactiveTransformer(M.get_config("nano", vocab_size=BYTES.vocab_size, **TINY))


def episode(name, distance=1, kind="long-range", slot="colour", **extra):
    """A memory episode: the fact turn, distance - 1 chat turns, the probe."""
    chat = [{"query": f"Hi {i}.", "answer": "Hello."} for i in range(distance - 1)]
    return dict(dict(name=name, query=f"{name} has a red ball.", answer="Got it.", distance=distance, kind=kind,
                     slot=slot, gold="red", interactions=chat + [{"query": f"What colour is {name}'s ball?",
                                                                  "answer": "red"}]), **extra)


def record_play(monkeypatch, hits=lambda eps, kw: [1.0] * len(eps)):
    """play replaced by a recorder: (names, reset_before_probe, own_answers) of every call."""
    calls = []

    def play(model, tok, episodes, cfg, reset_before_probe=False, own_answers=False):
        calls.append(([ep["name"] for ep in episodes], reset_before_probe, own_answers))
        return hits(episodes, dict(reset_before_probe=reset_before_probe, own_answers=own_answers))

    monkeypatch.setattr(evaluate, "play", play)
    return calls


def test_score_averages_chance_over_every_episodes_slot_and_recall_and_control_over_the_hits(monkeypatch):
    eps = [episode("p", slot="friend"), episode("q", kind="cumulative"), episode("r", kind="cumulative")]
    record_play(monkeypatch, lambda e, kw: [0.0, 0.0, 1.0] if kw["reset_before_probe"] else [1.0, 0.0, 1.0])
    r = evaluate.score(None, BYTES, eps, dict(evaluate.DEFAULTS))
    n_friend, n_colour = len(SLOTS["friend"]["values"]), len(SLOTS["colour"]["values"])
    assert r["n"] == 3 and r["recall"] == pytest.approx(2 / 3) and r["reset_control"] == pytest.approx(1 / 3)
    assert r["chance"] == pytest.approx((1 / (n_friend - 1) + 2 / n_colour) / 3)
    assert r["by_kind"] == {"long-range": 1.0, "cumulative": 0.5, "overwrite": 0.0}


def test_the_report_card_options_limits_and_inputs_reach_their_rows(monkeypatch):
    calls = record_play(monkeypatch)
    seen = {}
    monkeypatch.setattr(evaluate, "answer_tokens", lambda m, t, eps, cfg: seen.update(eps=eps) or {"ppl": 1.0, "acc": 0.5, "tokens": 3})
    eps = [episode(f"d1_{i}") for i in range(4)] + [episode(f"d2_{i}", 2) for i in range(4)]
    incontext = [episode("ic", 0), episode("ic2", 0)]
    span = [episode(f"s{k}_{i}", layout=lay, k=k) for lay in ("turns", "one turn") for k in (2, 1) for i in range(3)]
    paraphrases = {"questions": [episode(f"pq{i}") for i in range(4)] + [episode("pq_far", 2)]}
    cfg = dict(evaluate.DEFAULTS, distances=[1, 2], n_per_distance=3, n_span=2, chat_flow=False)
    results = evaluate.evaluate_memory(None, BYTES, eps, incontext, cfg, span, paraphrases)
    played = [names for names, reset, own in calls if not reset]
    assert not any(own for _, _, own in calls) and results["chat_flow"] == {}  # chat_flow=False: no chat flow at all
    # recall: n_per_distance of each distance; paraphrases likewise; span: n_span of each (layout, k)
    assert ["d1_0", "d1_1", "d1_2"] in played and ["d2_0", "d2_1", "d2_2"] in played
    assert ["pq0", "pq1", "pq2"] in played and ["pq_far"] in played
    assert ["ic", "ic2"] in played and results["in_context"]["n"] == 2
    assert list(results["span"]) == ["turns", "one turn"] and list(results["span"]["turns"]) == [1, 2]  # k sorted
    assert ["s1_0", "s1_1"] in played and ["s2_0", "s2_1"] in played and results["span"]["turns"][1]["n"] == 2
    assert seen["eps"] == eps and results["answer_tokens"]["tokens"] == 3  # perplexity on the recall episodes
    assert "chat flow" not in evaluate.format_table(results)
    calls.clear()
    evaluate.evaluate_memory(None, BYTES, eps, [], dict(cfg, chat_flow=True))
    assert (["d1_0", "d1_1", "d1_2"], False, True) in calls  # chat_flow=True: the same episodes, with the model's own answers


def test_the_report_card_prints_each_rows_own_numbers():
    row = lambda recall, control=None, **extra: dict(recall=recall, reset_control=control, n=4, **extra)
    results = {"recall": {1: row(0.5, 0.125, chance=0.25, by_kind={"long-range": 0.75, "cumulative": 0.375,
                                                                       "overwrite": 0.625}), 4: None},
               "binding": {1: row(0.375, 0.0625), 4: None}, "chat_flow": {1: row(0.875), 4: None},
               "paraphrase": {"questions": {1: row(0.3), 4: None}, "facts+questions": {1: row(0.2), 4: row(0.1)},
                              "other": {1: row(0.05)}},
               "in_context": {"recall": 0.9, "n": 7, "chance": 0.1}, "span": {"turns": {1: row(1.0, 0.0),
                                                                                       2: row(0.5, 0.25)}},
               "span_kept": {"turns": 1}, "answer_tokens": {"ppl": 3.14159, "acc": 0.4321, "tokens": 99}}
    lines = evaluate.format_table(results).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["row", "d=1", "d=4"]
    cells = {}
    for line in lines[2:]:
        if "|" in line:
            name, *values = [c.strip() for c in line.split("|")]
            cells.setdefault(name, []).append(values)
    assert cells["recall"] == [["50.0%", "-"]] and cells["chance"] == [["25.0%", "-"]]
    assert cells["reset control"] == [["12.5%", "-"], ["6.2%", "-"]]  # the recall row's control, then binding's
    assert (cells["long-range"], cells["cumulative"], cells["overwrite"]) == ([["75.0%", "-"]], [["37.5%", "-"]],
                                                                              [["62.5%", "-"]])
    assert cells["binding"] == [["37.5%", "-"]] and cells["chat flow (own answers)"] == [["87.5%", "-"]]
    assert cells["paraphrased questions"] == [["30.0%", "-"]] and cells["paraphrased facts+qs"] == [["20.0%", "10.0%"]]
    assert cells["other"] == [["5.0%", "-"]]  # a row without a label of its own keeps its name
    rest = [line for line in lines if "|" not in line]
    assert rest == ["in-context (one message, fresh memory): 90.0% of 7 (chance 10.0%)",
                    "span, turns:                    k=1 100.0% (0.0%)  k=2 50.0% (25.0%)  -> keeps 1",
                    "answer tokens of every turn, teacher-forced: perplexity 3.142, accuracy 43.2% (99 tokens)"]


def test_play_draws_each_batchs_memory_from_the_seed_and_writes_the_turns_in_order(monkeypatch):
    fresh, writes = [], []
    monkeypatch.setattr(evaluate, "fresh_memory", lambda m, n, g: fresh.append((n, g.initial_seed())) or [[]] * n)
    monkeypatch.setattr(evaluate, "write", lambda m, t, memory, records: writes.append(
        [r["query"] for r in records]) or memory)
    monkeypatch.setattr(evaluate, "answer", lambda m, t, queries, memory, n: ["red"] * len(queries))
    eps = [episode(f"e{i}", 3) for i in range(5)]
    cfg = dict(evaluate.DEFAULTS, batch_size=2, seed=77)
    assert evaluate.play(tiny_rxt(), BYTES, eps, cfg) == [1.0] * 5
    assert fresh == [(2, 77), (2, 77), (1, 77)]  # one fresh memory per batch, from a generator seeded with seed
    assert writes[:2] == [["e0 has a red ball.", "e1 has a red ball."], ["Hi 0.", "Hi 0."]]  # the fact, then chat
    assert len(writes) == 3 * 3  # 3 batches x (the fact and 2 chat turns): every turn but the probe
    fresh.clear(), writes.clear()
    evaluate.play(tiny_rxt(), BYTES, eps, cfg, reset_before_probe=True)
    assert fresh == [(2, 77)] * 4 + [(1, 77)] * 2 and writes == []  # the control: a fresh memory at the probe


def test_rxt_writes_each_turn_in_length_chunks_and_answers_greedily_from_its_prompt(monkeypatch):
    model = tiny_rxt()
    seen = {}
    monkeypatch.setattr(model, "update_memory", lambda stm, ids, attn_mask, chunks: seen.update(
        ids=ids, mask=attn_mask, chunks=chunks) or stm)
    records = [{"query": "q", "answer": "a"}] * 6 + [{"query": "x" * 40, "answer": "y" * 20}]
    memory = model.new_memory(7)
    assert evaluate.write(model, BYTES, memory, records) is memory
    ids, mask, _ = collate_interactions(BYTES, records, model.cfg.seq_len)
    assert torch.equal(seen["ids"], ids) and torch.equal(seen["mask"], mask)
    # on a CPU the padding is not computed: the six short turns and the long one run apart
    assert [(r.tolist(), n) for r, n in seen["chunks"]] == [([0, 1, 2, 3, 4, 5], 6), ([6], 64)]

    calls = []

    def generate(m, ids, attn_mask=None, stm=None, **kw):
        calls.append((ids, attn_mask, stm, kw))
        return torch.tensor([b("blue") + [EOS]] * ids.size(0)), torch.tensor([5] * ids.size(0))

    monkeypatch.setattr(evaluate.engine, "generate", generate)
    queries = ["Where?", "x" * 60 + " Who is it?"]  # the long one is cut to leave room for 9 tokens and [EOS]
    assert evaluate.answer(model, BYTES, queries, memory, 9) == ["blue", "blue"]
    (ids, attn_mask, stm, kw), = calls
    want_ids, want_mask = collate_queries(BYTES, queries, model.cfg.seq_len, 9)
    assert torch.equal(ids, want_ids) and torch.equal(attn_mask, want_mask) and stm is memory
    assert kw == dict(max_new_tokens=9, temperature=0, eos_id=EOS)
    base = M.StatelessDecoder(M.get_config("nano", vocab_size=BYTES.vocab_size, **TINY))
    evaluate.answer(base, BYTES, ["Where?"], [[]], 9)
    assert calls[-1][2] is None and calls[-1][3] == dict(max_new_tokens=9, temperature=0, eos_id=EOS)


def test_answer_perplexity_counts_the_answer_and_eos_of_every_turn_for_both_kinds_of_model(monkeypatch):
    """Uniform logits: perplexity V whatever the tokens, accuracy 0 (argmax 0 is never a target), and the count of
    answer tokens worked out by hand: "Got it." [EOS], "Hello." [EOS], "red" [EOS] = 8 + 7 + 4."""
    eps = [episode("Al", 2), episode("Bo", 2), episode("Cy", 1)]
    cfg = dict(evaluate.DEFAULTS, distances=[2], batch_size=1, seed=5)
    uniform = lambda ids: torch.zeros(*ids.shape, BYTES.vocab_size)
    rxt = tiny_rxt()
    seeds = []
    monkeypatch.setattr(rxt, "decode", lambda ids, stm: (uniform(ids), None, None))
    monkeypatch.setattr(rxt, "new_memory", lambda n, g: seeds.append(g.initial_seed()) or torch.zeros(
        2, n, 16, 32))
    r = evaluate.answer_tokens(rxt, BYTES, eps, cfg)
    assert r == {"ppl": pytest.approx(BYTES.vocab_size, rel=1e-5), "acc": 0.0, "tokens": 2 * 19} and seeds == [5, 5]
    base = M.StatelessDecoder(M.get_config("nano", vocab_size=BYTES.vocab_size, **dict(TINY, seq_len=128)))
    monkeypatch.setattr(base, "forward", lambda ids: (uniform(ids), None, None))
    r = evaluate.answer_tokens(base, BYTES, eps, dict(cfg, batch_size=2))  # both dialogues in one batch
    assert r == {"ppl": pytest.approx(BYTES.vocab_size, rel=1e-5), "acc": 0.0, "tokens": 2 * 19}
    r = evaluate.answer_tokens(base, BYTES, eps, dict(cfg, n_per_distance=1))
    assert r["tokens"] == 19


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def eval_world(tmp_path):
    """A tiny RxT checkpoint and a data folder with the recall episodes at distances 1 and 2."""
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    training.save_checkpoint(ckpt, tiny_rxt(), stage="smat", step=3, cfg={}, tokenizer=BYTES)
    data = tmp_path / "world"
    data.mkdir()
    write_jsonl(data / "episodes_test.jsonl", [episode("a"), episode("b", 2)])
    return ckpt, data


def test_evaluate_main_passes_each_optional_file_that_exists_and_saves_the_card_atomically(eval_world, tmp_path,
                                                                                          monkeypatch, capsys):
    ckpt, data = eval_world
    write_jsonl(data / "incontext_test.jsonl", [episode("ic", 0)])
    write_jsonl(data / "span_test.jsonl", [episode("sp", layout="turns", k=1)])
    write_jsonl(data / "paraphrase_questions_test.jsonl", [episode("pq")])  # no paraphrase_test.jsonl
    write_jsonl(data / "binding_test.jsonl", [episode("bd", binding=True)])
    seen = []
    card = {"recall": {1: None, 2: None}, "binding": {1: None, 2: None}, "chat_flow": {}, "in_context": None}
    monkeypatch.setattr(evaluate, "evaluate_memory", lambda *a: seen.append(a) or card)
    out = tmp_path / "cards" / "eval.json"  # a folder that does not exist yet
    base = [f"--ckpt={ckpt}", f"--data_dir={data}", f"--out={out}", "--distances=[1,2]", "--device=cpu"]
    assert evaluate.main(base) is card
    (model, tok, episodes, incontext, cfg, span, paraphrases, binding), = seen
    assert isinstance(model, M.ReactiveTransformer) and tok.vocab_size == BYTES.vocab_size
    names = lambda eps: [ep["name"] for ep in eps]
    assert names(episodes) == ["a", "b"] and names(incontext) == ["ic"] and names(span) == ["sp"]
    assert list(paraphrases) == ["questions"] and names(paraphrases["questions"]) == ["pq"]
    assert names(binding) == ["bd"] and cfg["distances"] == [1, 2]
    assert json.loads(out.read_text()) == {"ckpt": ckpt, "stage": "smat", "results": json.loads(json.dumps(card))}
    assert not (tmp_path / "cards" / "eval.json.tmp").exists()
    printed = capsys.readouterr().out
    assert "(stage smat, step 3) on episodes_test.jsonl" in printed and printed.rstrip().endswith(f"saved {out}")
    for name in ("incontext_test.jsonl", "span_test.jsonl", "paraphrase_questions_test.jsonl"):
        (data / name).unlink()
    evaluate.main(base)
    assert not seen[-1][3] and not seen[-1][5] and not seen[-1][6]  # worlds built before those rows have none


def test_evaluate_main_refuses_zero_counts_and_answer_budgets_that_leave_under_8_tokens_for_the_query(
        eval_world, tmp_path, monkeypatch):
    ckpt, data = eval_world
    monkeypatch.setattr(evaluate, "evaluate_memory", lambda *a: {"recall": {}, "binding": {}, "chat_flow": {},
                                                                  "in_context": None})
    base = [f"--ckpt={ckpt}", f"--data_dir={data}", f"--out={tmp_path / 'e.json'}", "--distances=[1]", "--device=cpu"]
    for key in ("n_span", "batch_size", "max_answer", "max_turn_answer", "n_per_distance"):
        with pytest.raises(cli.ConfigError, match=key):
            evaluate.main(base + [f"--{key}=0"])
    evaluate.main(base + ["--max_answer=56", "--max_turn_answer=56", "--seed=0"])  # 56 + 8 = the 64-token context
    for key in ("max_answer", "max_turn_answer"):
        with pytest.raises(cli.ConfigError, match="leave no room for a query"):
            evaluate.main(base + [f"--{key}=57"])


# -----------------------------------------------------------------------------
# bench.py


def test_bench_flags_defaults_quick_sizes_sections_and_refusals(tmp_path):
    nowhere = f"--data_dir={tmp_path / 'nowhere'}"
    a = bench.parse_args(["--device=cpu", nowhere])
    assert (a.preset, a.turns, a.seq_lens, a.repeats, a.attn_dim, a.attn_heads) == (
        "micro", 32, [1024, 2048, 4096, 8192], 5, 512, 16)
    assert a.sections == ["conversation", "attention", "training", "memory"]  # smat only where the world is built
    (tmp_path / "episodes_train.jsonl").write_text("")
    assert bench.parse_args(["--device=cpu", f"--data_dir={tmp_path}"]).sections == list(bench.SECTIONS)
    q = bench.parse_args(["--quick", "--device=cpu", nowhere, "--sections= memory, attention"])
    assert (q.preset, q.turns, q.seq_lens, q.repeats, q.attn_dim, q.attn_heads, q.sections) == (
        "nano", 3, [64, 128], 1, 64, 8, ["memory", "attention"])
    q = bench.parse_args(["--quick", "--device=cpu", nowhere, "--turns=5", "--repeats=2", "--seq_lens=8,16"])
    assert (q.turns, q.repeats, q.seq_lens) == (5, 2, [8, 16])  # --quick keeps what was asked for
    for flags, words in [(["--seq_lens=8,7"], "seq_lens"), (["--repeats=0"], "repeats"),
                         (["--attn_heads=2", "--attn_dim=8"], "attn_heads"),
                         (["--attn_heads=4", "--attn_dim=18"], "attn_dim"),  # not a multiple of the heads
                         (["--attn_heads=4", "--attn_dim=12"], "attn_dim")]:  # head size 3: odd
        with pytest.raises(cli.ConfigError, match=words):
            bench.parse_args(["--device=cpu", nowhere] + flags)
    with pytest.raises(cli.CheckpointError, match="checkpoint not found"):
        bench.parse_args(["--device=cpu", nowhere, f"--baseline_ckpt={tmp_path / 'none.pt'}"])


def fake_clock(monkeypatch, times):
    ticks = iter(times)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))


def test_timed_is_the_median_of_the_repeats_after_untimed_warmups(monkeypatch):
    calls = []
    fake_clock(monkeypatch, [0, 1, 10, 12, 20, 29])  # the repeats take 1, 2 and 9 s: median 2, mean 4
    assert bench.timed(lambda: calls.append(1), torch.device("cpu"), 3, warmup=2) == 2
    assert len(calls) == 5
    fake_clock(monkeypatch, [0, 0.5])  # a 4x4 matmul of 2 * 4^3 FLOPs in 0.5 s
    assert bench.matmul_flops_per_s(torch.device("cpu"), torch.float32, n=4, repeats=1) == 256


def test_memory_and_table_helpers_report_bytes_and_aligned_columns(capsys):
    assert bench.max_rss() > 50 * 2**20  # this process imported torch: tens of MiB at least, in bytes
    bench.reset_peak_memory(torch.device("cpu"))
    assert bench.peak_memory(torch.device("cpu")) > 50 * 2**20
    assert (bench.ms(0.0123), bench.mib(3.5 * 2**20)) == ("12.3", "3.50")
    bench.print_table("T", ["a", "bb"], [[1, "xyz"], ["long", 2]])
    assert capsys.readouterr().out == "\nT\n   a   bb\n----  ---\n   1  xyz\nlong    2\n"


def test_attention_variants_have_their_query_and_key_value_heads():
    assert bench.attention_variants(16) == {"MHA": (16, 16), "GQA": (16, 4), "MQA": (16, 1), "SQA": (8, 4),
                                            "sSQA": (8, 8), "xSQA": (4, 4)}
    assert bench.attention_variants(4)["GQA"] == (4, 1) and bench.attention_variants(4)["SQA"] == (2, 1)


def test_memory_section_counts_the_stm_the_per_turn_caches_and_the_turns_shown(capsys):
    args = argparse.Namespace(ckpt="", preset="nano", turns=5)
    peaks = {"rxt": {"peak_memory_bytes": 11}, "baseline": {"peak_memory_bytes": 22}}
    r = bench.bench_memory(args, torch.device("cpu"), contextlib.nullcontext(), peaks)
    c = M.PRESETS["nano"]
    assert r["kv_bytes_per_element"] == 4 and r["stm_bytes"] == c.n_layers * c.stm_size * c.d_model * 4  # fp32
    # this turn's self-attention keys and values (query + answer) and the STM's projected K/V
    assert r["rxt_per_turn_cache_bytes"] == 2 * c.n_layers * c.n_kv_heads * c.head_dim * (64 + c.stm_size) * 4
    assert list(r["by_turn"]) == [1, 2, 4, 5] and r["peak_memory_bytes"] == {"rxt": 11, "baseline": 22}
    assert all(t["rxt_stm_bytes"] == r["stm_bytes"] for t in r["by_turn"].values())
    last, = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["5"]]
    assert last[1] == "256" and float(last[-1]) == pytest.approx(
        r["by_turn"][5]["baseline_kv_bytes"] / r["stm_bytes"], abs=0.01)


def fake_timed(monkeypatch):
    """timed() replaced: each call runs fn once and takes 1, 2, 3, ... s; returns the list of repeats asked for."""
    ticks, repeats = iter(range(1, 10_000)), []

    def timed(fn, device, n, warmup=1):
        fn()
        repeats.append(n)
        return next(ticks)

    monkeypatch.setattr(bench, "timed", timed)
    return repeats


def test_attention_section_speedups_score_flops_and_grouped_kv_comparison(monkeypatch):
    repeats = fake_timed(monkeypatch)
    args = argparse.Namespace(attn_dim=16, attn_heads=4, repeats=5, seq_lens=[8, 16], seed=0)
    r = bench.bench_attention(args, torch.device("cpu"), contextlib.nullcontext())
    assert r["head_dim"] == 4 and set(repeats) == {3}  # at most 3 repeats per measurement
    names = list(bench.attention_variants(4))
    for ti, T in enumerate([8, 16]):
        mha_fwd = 1 + 2 * 6 * ti  # per length and variant, in order: forward, then forward+backward
        for vi, name in enumerate(names):
            v = r["variants"][name]
            m, fwd = v["by_len"][T], 1 + 2 * (6 * ti + vi)
            assert (m["forward_s"], m["forward_backward_s"]) == (fwd, fwd + 1)
            assert m["forward_backward_speedup"] == pytest.approx((mha_fwd + 1) / (fwd + 1))
            assert m["score_gflops"] == pytest.approx(bench.score_flops(1, v["n_q_heads"], T, 4) / 1e9)
    # SDPA with grouped K/V, at the longest length, for the variants whose K/V heads are fewer than their queries
    assert set(r["sdpa_grouped_kv"]) == {"GQA", "MQA", "SQA"}
    assert {e["seq_len"] for e in r["sdpa_grouped_kv"].values()} == {16}
    assert r["sdpa_grouped_kv"]["GQA"]["enable_gqa_s"] + 1 == r["sdpa_grouped_kv"]["GQA"]["repeat_interleave_s"]


class NoOptimizer:
    """Records what it would train, trains nothing (a real optimizer's first use imports torch._dynamo: seconds)."""

    def __init__(self, params, seen=None):
        if seen is not None:
            seen.append(list(params))

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def test_training_section_counts_active_params_tokens_and_the_share_of_a_matmul(monkeypatch):
    repeats = fake_timed(monkeypatch)
    monkeypatch.setattr(bench, "matmul_flops_per_s", lambda device, dtype: 1e6)
    tiny = M.get_config("nano", **dict(TINY, vocab_size=64))
    monkeypatch.setattr(bench.M, "get_config", lambda preset, **kw: tiny)
    params = []
    monkeypatch.setattr(bench.training, "make_optimizer", lambda p, *a: NoOptimizer(p, params))
    args = argparse.Namespace(quick=True, repeats=5, seed=0)
    r = bench.bench_training(args, torch.device("cpu"), contextlib.nullcontext())
    (name, p), = r["presets"].items()
    model = M.ReactiveTransformer(tiny)
    counts = model.param_counts()
    n_active = counts["encoder"] + counts["decoder_active"] - 2 * M.count_params(model.embed)
    assert name == "nano" and (p["batch"], p["seq_len"], p["step_s"]) == (2, 32, 1) and repeats == [3]
    assert p["active_matmul_params"] == n_active and p["tokens_per_s"] == 64
    assert p["fraction_of_matmul"] == pytest.approx(6 * n_active * 64 / 1e6) and "mfu" not in p
    # as train_joint: every parameter but the memory attention's is trained
    assert len(params[0]) == len([n for n, _ in model.named_parameters() if not n.startswith("memory_attention.")])


def test_conversation_section_takes_each_turns_median_over_the_repeats_and_derives_its_ratios(monkeypatch, capsys):
    tiny = M.get_config("nano", **dict(TINY, vocab_size=64))
    monkeypatch.setattr(bench.M, "get_config", lambda preset, **kw: tiny)
    peaks = iter([1, 4, 9, 2] * 2)  # per model: the warm-up's peak, then the three timed runs'
    monkeypatch.setattr(bench, "peak_memory", lambda device: next(peaks))
    ops = []  # the profiler's first use imports torch._dynamo (seconds): its count is replaced, its inputs kept
    monkeypatch.setattr(bench, "decode_ops", lambda name, model, query, device, amp: ops.append((name, query)) or 7.0)
    runs, real = [], bench.run_conversation
    monkeypatch.setattr(bench, "run_conversation", lambda *a: runs.append((a[0], real(*a))) or runs[-1][1])
    args = argparse.Namespace(preset="nano", ckpt="", baseline_ckpt="", seed=0, turns=2, repeats=3)
    r = bench.bench_conversation(args, torch.device("cpu"), contextlib.nullcontext())
    approx = pytest.approx
    for name in ("rxt", "baseline"):
        warm, *timed = [turns for n, (turns, _) in runs if n == name]
        assert len(warm) == 2 and len(timed) == 3  # a 2-turn warm-up, then every repeat
        per_turn, m = r[name]["per_turn"], r[name]
        for i, t in enumerate(per_turn):
            for k in ("prefill", "generation", "update"):
                assert t[k] == statistics.median(run[i][k] for run in timed)
            assert t["tokens"] == timed[0][i]["tokens"]
        assert m["peak_memory_bytes"] == 9  # the largest peak of the timed runs
        assert m["turn_n_over_turn_1"] == approx(per_turn[-1]["user"] / per_turn[0]["user"])
        assert m["prefill_turn_n_over_turn_1"] == approx(per_turn[-1]["prefill"] / per_turn[0]["prefill"])
        assert m["total_with_update_s"] == approx(sum(t["user"] + t["update"] for t in per_turn))
        assert m["tokens_processed"] == sum(t["tokens"] for t in per_turn)
        # 32 answer tokens: the first comes with the prefill, the other 31 from generation
        assert m["decode_token_s"] == approx(statistics.median(t["generation"] / 31 for t in per_turn))
        assert m["aten_ops_per_token"] == 7.0
    assert [name for name, _ in ops] == ["rxt", "baseline"] and all(  # turn 1's query
        torch.equal(query, torch.randint(64, (32,), generator=torch.Generator().manual_seed(0))) for _, query in ops)
    rxt = r["rxt"]["per_turn"]
    assert r["rxt_decode_tokens_per_s"] == approx(statistics.median(31 / t["generation"] for t in rxt))
    assert r["rxt_full_turn_s"] == approx(statistics.median(t["user"] + t["update"] for t in rxt))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"   baseline / RxT total user-facing time: {r['total_user_baseline_over_rxt']:.2f}x;")
    assert f"RxT at batch 1: {r['rxt_decode_tokens_per_s']:.0f} generated tokens/s" in last


def test_bench_main_runs_only_the_asked_sections_and_builds_its_summary_from_their_numbers(monkeypatch, tmp_path,
                                                                                            capsys):
    calls = []

    def section(name, result):
        def run(args, device, amp, *rest):
            calls.append((name, args.repeats, rest))
            return result
        monkeypatch.setattr(bench, f"bench_{name}", run)

    conversation = {"rxt": {"turn_n_over_turn_1": 1.1}, "baseline": {"turn_n_over_turn_1": 3.4},
                    "total_user_baseline_over_rxt": 2.5}
    attention = {"variants": {"sSQA": {"by_len": {128: {"forward_speedup": 1.5}}},
                              "xSQA": {"by_len": {128: {"forward_speedup": 2.25}}}}}
    section("conversation", conversation)
    section("attention", attention)
    section("training", {"presets": {"nano": {"tokens_per_s": 1234.4}, "micro": {"tokens_per_s": 99.6}}})
    section("memory", {"stm_bytes": 1})
    section("smat", {"chunks_episodes_per_s": 12.34, "speedup": 1.5})
    out = tmp_path / "b" / "bench.json"
    r = bench.main(["--quick", "--device=cpu", f"--out={out}", "--repeats=4",
                    "--sections=conversation,attention,training,memory,smat"])
    assert r["summary"] == ("turn-3/turn-1 RxT 1.10x vs baseline 3.40x (total conversation time baseline/RxT 2.50x); "
                            "at 128 tokens fwd sSQA 1.50x, xSQA 2.25x over MHA; nano 1234 train tokens/s, micro 100 "
                            "train tokens/s; SMAT 12.3 episodes/s in chunks, 1.50x padded")
    assert [c[0] for c in calls] == ["conversation", "attention", "training", "memory", "smat"]
    assert calls[3][2] == (conversation,)  # the memory section reads the conversation's peaks
    saved = json.loads(out.read_text())
    assert saved["summary"] == r["summary"] and saved["args"]["sections"] == list(bench.SECTIONS)
    assert saved["env"]["device"] == "cpu" and saved["env"]["quick"] is True
    assert capsys.readouterr().out.rstrip().endswith("summary: " + r["summary"])
    calls.clear()
    r = bench.main(["--quick", "--device=cpu", f"--out={out}", "--repeats=4", "--sections=memory"])
    # the memory section alone: one quiet conversation, one repeat, for the peak memory; only memory is reported
    assert calls == [("conversation", 1, (True,)), ("memory", 4, (conversation,))]
    assert "conversation" not in r and r["memory"] == {"stm_bytes": 1} and r["summary"] == ""


def test_smat_section_compares_the_median_padded_and_chunked_steps(monkeypatch, world):
    import train_mrl
    monkeypatch.chdir(bench.os.path.dirname(bench.__file__))  # it reads config/nano_mrl.py, the demo's SMAT
    times, warmups, chunks = iter([1.0, 4.0, 2.0, 5.0, 9.0, 30.0]), [], []  # padded 1, 2, 9; chunked 4, 5, 30

    def timed(fn, device, n, warmup=1):
        fn()
        warmups.append(warmup)
        return next(times)

    monkeypatch.setattr(bench, "timed", timed)
    monkeypatch.setattr(train_mrl, "smat_loss", lambda model, batch, cfg, g: (
        chunks.append(cfg["chunks"]) or model.embed.weight.sum() * 0, {}))
    monkeypatch.setattr(bench.training, "make_optimizer", lambda params, *a: NoOptimizer(params))
    args = argparse.Namespace(quick=True, data_dir=world, seed=0, repeats=3)
    r = bench.bench_smat(args, torch.device("cpu"), contextlib.nullcontext())
    assert chunks == [False, True] * 3 and warmups == [1, 1, 0, 0, 0, 0]  # alternating; each warmed up once
    assert (r["padded_step_s"], r["chunks_step_s"], r["speedup"]) == (2.0, 5.0, 0.4)  # medians, padded / chunked
    assert (r["batch"], r["padded_episodes_per_s"], r["chunks_episodes_per_s"]) == (8, 4.0, 1.6)
    assert r["phase"] == [1, 2, 4] and list(r["real_share"]) == ["[1]", "[1, 2]", "[1, 2, 4]"]
