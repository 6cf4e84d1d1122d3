"""The evaluation measures what its rows say: two hand-made episodes and a scripted model whose every row can be
worked out by hand (the model's answers and writes are the only thing replaced)."""

import math
import os
import re
import shutil

import pytest
import torch

import engine
import evaluate
import training
from conftest import TINY
from data.loaders import render_dialogue
from data.memory_world import SLOTS, read_jsonl
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, StatelessDecoder, get_config

PLAIN = {"query": "Mia has a red ball.", "answer": "Got it.", "distance": 1, "gold": "red", "kind": "long-range",
         "slot": "colour", "interactions": [{"query": "What colour is Mia's ball?", "answer": "red"}]}
BINDING = {"query": "Tom has a blue kite. Ann has a green kite.", "answer": "Got it.", "distance": 1, "gold": "green",
           "kind": "long-range", "slot": "colour", "binding": True,
           "interactions": [{"query": "What colour is Ann's kite?", "answer": "green"}]}
# facts and question in one message, nothing before it (the in-context row)
INCONTEXT = {"query": "Tom has a blue kite. Ann has a green kite. What colour is Ann's kite?", "answer": "green",
             "interactions": [], "gold": "green", "distance": 0, "kind": "in-context", "slot": "colour", "binding": True}
# binding with a change: not in the binding row ("Now Ann's kite is ..." names her once more)
CHANGED = dict(BINDING, kind="overwrite", query="Ann has a pink kite. Tom has a blue kite. Now Ann's kite is green.")


def scripted(monkeypatch, writes, budgets=None):
    """A model that keeps what was written as text and answers a question with the first colour it was told, whoever
    it belonged to (so it recalls the plain fact and fails the binding one); anything else it answers 'ok'.
    budgets: gets (is a question, max_new_tokens) of every call."""
    monkeypatch.setattr(evaluate, "fresh_memory", lambda model, n, g: [[] for _ in range(n)])

    def write(model, tok, memory, records):
        writes.append([dict(r) for r in records])
        return [m + [r["query"] + " " + r["answer"]] for m, r in zip(memory, records)]

    def answer(model, tok, queries, memory, max_new_tokens):
        if budgets is not None:
            budgets.extend((q.endswith("?"), max_new_tokens) for q in queries)
        said = []
        for q, m in zip(queries, memory):
            told = re.findall(r"has a (\w+)", " ".join(m))
            said.append((told[0] if told else "nothing") if q.endswith("?") else "ok")
        return said

    monkeypatch.setattr(evaluate, "write", write)
    monkeypatch.setattr(evaluate, "answer", answer)
    monkeypatch.setattr(evaluate, "answer_tokens", lambda *a: None)


def test_recall_binding_and_chat_flow_rows_on_two_episodes_worked_out_by_hand(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    writes, budgets = [], []
    scripted(monkeypatch, writes, budgets)
    cfg = dict(evaluate.DEFAULTS, distances=[1], max_answer=5, max_turn_answer=40)
    results = evaluate.evaluate_memory(model, tok, [PLAIN, BINDING, CHANGED], [INCONTEXT], cfg)
    recall, binding, flow = results["recall"][1], results["binding"][1], results["chat_flow"][1]
    assert recall["n"] == 3 and recall["recall"] == 1 / 3 and recall["reset_control"] == 0.0
    assert recall["chance"] == pytest.approx(1 / len(SLOTS["colour"]["values"])) and recall["by_kind"]["long-range"] == 0.5
    assert binding["n"] == 1 and binding["recall"] == 0.0  # only the clean binding episode, which the model gets wrong
    assert flow["n"] == 3 and flow["recall"] == 1 / 3 and "reset_control" not in flow
    assert results["in_context"]["recall"] == 0.0 and "reset_control" not in results["in_context"]  # nothing to reset
    # the chat flow's earlier turns get a whole answer's budget; the one-word probe its own
    assert set(budgets) == {(True, 5), (False, 40)}
    # recall writes the reference answers; the chat flow writes the model's own ("ok"), as chat.py does
    answers = [[r["answer"] for r in w] for w in writes]
    assert ["Got it."] * 3 in answers and ["ok"] * 3 in answers
    assert not any(r["query"].endswith("?") for w in writes for r in w)  # the question is asked, never written first


def test_the_stateless_baseline_answers_with_the_whole_history_in_its_prompt(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = StatelessDecoder(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    prompts = []

    def generate(m, ids, attn_mask=None, stm=None, **kw):
        prompts.append([ids[b, :int(attn_mask[b].sum())].tolist() for b in range(ids.size(0))])
        return torch.full((ids.size(0), 1), tok.eos_id), torch.ones(ids.size(0), dtype=torch.long)

    monkeypatch.setattr(engine, "generate", generate)
    history = evaluate.write(model, tok, evaluate.fresh_memory(model, 1, None), [PLAIN])
    assert history == [[PLAIN]]
    history = evaluate.write(model, tok, history, [BINDING])
    assert history == [[PLAIN, BINDING]]  # every turn stays, in order
    evaluate.answer(model, tok, ["What colour is Mia's ball?"], history, 4)  # and the prompt holds them all
    want = render_dialogue(tok, [PLAIN, BINDING], model.cfg.seq_len - 4 - 1, query="What colour is Mia's ball?")[0]
    assert prompts == [[want]] and tok.encode("Mia has a red ball.")[0] in want


def test_answers_are_compared_without_case_or_punctuation():
    from scores import normalize
    assert normalize("Paul.") == normalize("paul") == "paul" and normalize(" Red! ") == "red"
    assert normalize("Paul") != normalize("Pauline")


def test_chance_is_one_over_the_values_the_slot_can_take():
    names = SLOTS["friend"]["values"]
    assert evaluate.chance({"slot": "friend"}) == 1 / (len(names) - 1)  # nobody is their own best friend
    assert evaluate.chance({"slot": "food"}) == 1 / len(SLOTS["food"]["values"])


def test_answer_perplexity_weighs_every_answer_token_the_same(world, monkeypatch):
    """Batches hold different numbers of answer tokens: the perplexity is over tokens, not a mean of batch means."""
    from data.memory_world import read_jsonl
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **dict(TINY, stm_init_std=0.0)))
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_test.jsonl")) if ep["distance"] == 1][:3]
    cfg = dict(evaluate.DEFAULTS, distances=[1], n_per_distance=3)
    batched = evaluate.answer_tokens(model, tok, eps, dict(cfg, batch_size=2))  # batches of 2 and 1 episodes
    alone = [evaluate.answer_tokens(model, tok, [ep], dict(cfg, batch_size=1)) for ep in eps]
    nll = sum(math.log(a["ppl"]) * a["tokens"] for a in alone) / sum(a["tokens"] for a in alone)
    assert batched["tokens"] == sum(a["tokens"] for a in alone)
    assert math.log(batched["ppl"]) == pytest.approx(nll, rel=1e-4)
    # accuracy likewise, for a model that always says [EOS]: right once per answer, answers of different lengths
    eos = torch.nn.functional.one_hot(torch.tensor(tok.eos_id), tok.vocab_size).float()
    monkeypatch.setattr(model, "decode", lambda ids, stm: (eos.expand(*ids.shape, -1), None, None))
    batched = evaluate.answer_tokens(model, tok, eps, dict(cfg, batch_size=2))
    alone = [evaluate.answer_tokens(model, tok, [ep], dict(cfg, batch_size=1)) for ep in eps]
    acc = sum(a["acc"] * a["tokens"] for a in alone) / sum(a["tokens"] for a in alone)
    assert len({a["acc"] for a in alone}) > 1 and batched["acc"] == pytest.approx(acc, rel=1e-5)


def span_episode(layout, facts, gold, probe):
    turns = [" ".join(facts)] if layout.startswith("one turn") else facts
    return {"query": turns[0], "answer": "Got it.", "distance": len(turns), "gold": gold, "kind": "span",
            "layout": layout, "k": len(facts), "slot": "colour",
            "interactions": [{"query": t, "answer": "Got it."} for t in turns[1:]] + [{"query": probe, "answer": gold}]}


def test_span_rows_recall_by_layout_and_k_and_count_the_facts_kept(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    scripted(monkeypatch, [])  # answers with the first colour told
    q = "What colour is Mia's kite?"
    span = [span_episode("turns, one person", ["Mia has a red kite."], "red", q),
            span_episode("turns, one person", ["Mia has a red kite.", "Mia has a blue car."], "red", q),
            span_episode("turns, one person", ["Mia has a pink car.", "Mia has a red kite."], "red", q),
            span_episode("one turn, one person", ["Mia has a red kite."], "red", q),
            span_episode("one turn, one person", ["Mia has a red kite.", "Mia has a blue car."], "red", q)]
    results = evaluate.evaluate_memory(model, tok, [PLAIN], [], dict(evaluate.DEFAULTS, distances=[1]), span)
    turns, one = results["span"]["turns, one person"], results["span"]["one turn, one person"]
    assert sorted(turns) == [1, 2] and turns[1]["recall"] == 1.0 and turns[2]["recall"] == 0.5
    assert turns[2]["n"] == 2 and turns[2]["reset_control"] == 0.0 and one[2]["recall"] == 1.0
    assert results["span_kept"] == {"turns, one person": 1, "one turn, one person": 2}


def test_facts_kept_is_the_largest_k_with_every_smaller_k_at_90_percent():
    rows = lambda *r: {k: {"recall": v} for k, v in zip((1, 2, 4, 8), r)}
    assert evaluate.kept(rows(1.0, 0.95, 0.9, 0.5)) == 4
    assert evaluate.kept(rows(1.0, 0.5, 0.95, 0.95)) == 1  # a gap stops the count
    assert evaluate.kept(rows(0.89, 1.0, 1.0, 1.0)) == 0


def test_paraphrase_rows_score_the_reworded_episodes_by_distance(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    scripted(monkeypatch, [])  # finds "has a <colour>": the world's own fact; a reworded fact gives it nothing
    reworded = dict(PLAIN, query="Mia owns a red ball.", interactions=[{"query": "Tell me the colour of Mia's ball.",
                                                                       "answer": "red"}])
    far = dict(PLAIN, distance=2, interactions=[{"query": "Hi!", "answer": "Hello!"}] + PLAIN["interactions"])
    paraphrases = {"questions": [dict(PLAIN, interactions=reworded["interactions"]), far], "facts+questions": [reworded]}
    results = evaluate.evaluate_memory(model, tok, [PLAIN, far], [], dict(evaluate.DEFAULTS, distances=[1, 2]),
                                       paraphrases=paraphrases)
    questions, both = results["paraphrase"]["questions"], results["paraphrase"]["facts+questions"]
    assert questions[1]["n"] == 1 and questions[1]["recall"] == 0.0  # the scripted model only answers "...?"
    assert questions[2]["recall"] == 1.0 and both[1]["recall"] == 0.0 and both[2] is None
    assert "paraphrased questions" in evaluate.format_table(results)


def test_the_binding_row_reads_its_own_file_of_episodes_when_there_is_one(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    scripted(monkeypatch, [])  # answers with the first colour told: right when the probed person was told first
    first = dict(BINDING, gold="blue", interactions=[{"query": "What colour is Tom's kite?", "answer": "blue"}])
    cfg = dict(evaluate.DEFAULTS, distances=[1])
    results = evaluate.evaluate_memory(model, tok, [PLAIN, BINDING], [], cfg, binding=[first, first, BINDING])
    assert results["binding"][1]["n"] == 3 and results["binding"][1]["recall"] == pytest.approx(2 / 3)
    results = evaluate.evaluate_memory(model, tok, [PLAIN, BINDING], [], dict(cfg, n_per_distance=1),
                                       binding=[first, first, BINDING])
    assert results["binding"][1]["n"] == 1


def test_an_answer_ends_at_its_eos_even_when_other_rows_go_on(world, monkeypatch):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    red, blue, green = tok.encode("red"), tok.encode("blue"), tok.encode("green")
    rows = [red + [tok.eos_id] + green, blue + green + [tok.eos_id]]
    n = max(map(len, rows))
    ans = torch.tensor([r + [tok.eos_id] * (n - len(r)) for r in rows])
    lengths = torch.tensor([len(red) + 1, len(blue) + len(green) + 1])
    monkeypatch.setattr(evaluate.engine, "generate", lambda *a, **k: (ans, lengths))
    torch.manual_seed(0)
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    said = evaluate.answer(model, tok, ["What colour?", "What colour?"], model.new_memory(2), 8)
    assert said == ["red", "bluegreen"]


def test_answer_perplexity_does_not_depend_on_the_batch_size(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    torch.manual_seed(0)
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY)).eval()
    model.cfg.stm_init_std = 0.0  # no noise in the fresh memory: the rows' draws cannot differ
    eps = read_jsonl(os.path.join(world, "episodes_test.jsonl"))
    cfg = dict(evaluate.DEFAULTS, distances=[2], n_per_distance=4)
    together = evaluate.answer_tokens(model, tok, eps, dict(cfg, batch_size=4))
    alone = evaluate.answer_tokens(model, tok, eps, dict(cfg, batch_size=1))
    assert together["tokens"] == alone["tokens"] and together["ppl"] == pytest.approx(alone["ppl"], rel=1e-6)
    fewer = evaluate.answer_tokens(model, tok, eps, dict(cfg, batch_size=4, n_per_distance=2))
    assert 0 < fewer["tokens"] < together["tokens"]  # n_per_distance episodes, not every one of that distance


def test_a_hit_is_the_gold_word_itself_not_an_answer_that_contains_it(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    said = iter([["Red.", "red and green"]])
    monkeypatch.setattr(evaluate, "write", lambda model, tok, memory, records: memory)
    monkeypatch.setattr(evaluate, "answer", lambda model, tok, queries, memory, n: next(said))
    two_reds = [PLAIN, dict(PLAIN, query="Mia has a red and green ball.")]
    assert evaluate.play(model, tok, two_reds, dict(evaluate.DEFAULTS, batch_size=2)) == [1.0, 0.0]


def test_answer_perplexity_of_a_model_that_knows_nothing_is_the_vocabulary_size(world, monkeypatch):
    """Uniform next-token probabilities: every answer token costs log V nats, so the perplexity is exactly V."""
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    monkeypatch.setattr(model, "decode", lambda ids, stm: (torch.zeros(*ids.shape, tok.vocab_size), None, None))
    eps = [ep for ep in read_jsonl(os.path.join(world, "episodes_test.jsonl")) if ep["distance"] == 1][:2]
    result = evaluate.answer_tokens(model, tok, eps, dict(evaluate.DEFAULTS, distances=[1], n_per_distance=2))
    assert result["tokens"] > 0 and result["ppl"] == pytest.approx(tok.vocab_size, rel=1e-4)


def test_the_tables_reset_control_and_chance_lines_show_their_own_numbers():
    row = {"recall": 0.5, "reset_control": 0.125, "chance": 0.25, "n": 8, "by_kind": dict.fromkeys(evaluate.KINDS, 0.5)}
    results = {"recall": {1: row, 2: None}, "binding": {1: None, 2: None}, "chat_flow": {1: None, 2: None},
               "in_context": None}
    lines = evaluate.format_table(results).splitlines()
    first = [line.split("|")[0].strip() for line in lines].index("recall")
    recall, control, chance = (line.split("|")[1].strip() for line in lines[first:first + 3])
    assert (recall, control, chance) == ("50.0%", "12.5%", "25.0%")


def test_the_baselines_prompt_leaves_room_in_its_context_for_the_answer(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = StatelessDecoder(get_config("nano", vocab_size=tok.vocab_size, **dict(TINY, seq_len=64)))
    lengths = []

    def generate(m, ids, attn_mask=None, stm=None, max_new_tokens=None, **kw):
        lengths.append(int(attn_mask.sum(dim=1).max()) + max_new_tokens)
        return torch.full((ids.size(0), 1), tok.eos_id), torch.ones(ids.size(0), dtype=torch.long)

    monkeypatch.setattr(engine, "generate", generate)
    history = [[{"query": "Hi.", "answer": "Hello."}] * 20]  # far more than 64 tokens, in short turns
    evaluate.answer(model, tok, ["What colour is Ann's kite?"], history, 8)
    assert lengths and lengths[0] <= model.cfg.seq_len  # the prompt plus the longest answer fit the context


def test_per_kind_recall_counts_each_kinds_own_hits(monkeypatch, world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY))
    scripted(monkeypatch, [])
    result = evaluate.score(model, tok, [PLAIN, dict(PLAIN, kind="overwrite", gold="blue")],
                            dict(evaluate.DEFAULTS, batch_size=2))
    assert result["by_kind"]["long-range"] == 1.0 and result["by_kind"]["overwrite"] == 0.0


def test_without_a_binding_file_the_binding_row_scores_the_recall_episodes_binding_ones(monkeypatch, world, tmp_path):
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_memory", lambda *a: seen.update(binding=a[-1]) or {})
    monkeypatch.setattr(evaluate, "format_table", lambda results: "")
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    ckpt = tmp_path / "ckpt.pt"
    training.save_checkpoint(str(ckpt), ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **TINY)),
                             stage="smat", step=1, cfg={}, tokenizer=tok)
    data = tmp_path / "world"
    data.mkdir()
    for name in ("tokenizer.tiktoken", "episodes_test.jsonl"):
        shutil.copy(os.path.join(world, name), data / name)
    evaluate.main([f"--ckpt={ckpt}", f"--data_dir={data}", f"--out={tmp_path / 'eval.json'}", "--distances=[1]"])
    assert seen["binding"] is None  # evaluate_memory then takes the binding episodes among the recall ones
