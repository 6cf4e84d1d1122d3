import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest

from data import memory_world
from data.loaders import episode_turns
from data.memory_world import (NAMES, PHRASINGS, SLOTS, SPAN_LAYOUTS, articles, build_world, is_test, make_episodes,
                               make_incontext, make_interactions, make_span, make_stories, probe_text, question_turn,
                               random_value, read_jsonl, write_jsonl)
from data.tinystories import iter_stories
from data.tokenizer import Tokenizer

DISTANCES = (1, 2, 4, 8, 16)
KINDS = ("long-range", "cumulative", "overwrite")


@pytest.fixture(scope="module")
def train():
    return make_episodes(600, seed=0, split="train")


@pytest.fixture(scope="module")
def test():
    return make_episodes(300, seed=1, split="test")


def stated_values(text, p, slot, x):
    """The values that text states for p's (slot, thing), in order of appearance."""
    found = []
    for v in SLOTS[slot]["values"]:
        for template in [SLOTS[slot]["fact"]] + SLOTS[slot]["change"]:
            sentence = articles(template.format(p=p, x=x, v=v))
            found += [(m.start(), -m.end(), v) for m in re.finditer(r"(?<!\w)" + re.escape(sentence), text)]
    # a sentence inside a longer one ("Mia is at the park." in "Now Mia is at the park.") is the same statement
    out, end = [], -1
    for start, neg_end, v in sorted(found):
        if -neg_end > end:
            out.append(v)
            end = -neg_end
    return out


def test_same_seed_gives_the_same_world_and_another_seed_a_different_one():
    assert make_stories(50, 3) == make_stories(50, 3) != make_stories(50, 4)
    assert make_interactions(50, 3) == make_interactions(50, 3) != make_interactions(50, 4)
    assert make_episodes(50, 3) == make_episodes(50, 3) != make_episodes(50, 4)


def test_episodes_have_distance_turns_with_the_probe_last(train, test):
    for ep in train + test:
        assert len(ep["interactions"]) == ep["distance"]
        probe = ep["interactions"][-1]
        assert probe["answer"] == ep["gold"] and " " not in ep["gold"]
        assert probe["query"] == SLOTS[ep["slot"]]["probe"].format(p=ep["name"], x=ep["thing"])
        assert episode_turns(ep)[0] == {"query": ep["query"], "answer": ep["answer"]}


def test_kinds_and_distances_are_balanced(train):
    counts = Counter((ep["kind"], ep["distance"]) for ep in train)
    assert set(counts) == {(k, d) for k in KINDS for d in DISTANCES}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_test_split_only_probes_held_out_combinations(train, test):
    probed = lambda eps: {(ep["name"], ep["slot"], ep["gold"]) for ep in eps}
    assert all(is_test(*c) for c in probed(test))
    assert not any(is_test(*c) for c in probed(train))
    assert not probed(train) & probed(make_episodes(2000, seed=5, split="test"))
    # ...but the words themselves are all seen as training answers, so the test measures memory, not vocabulary
    assert {ep["gold"] for ep in test} <= {ep["gold"] for ep in make_episodes(3000, seed=2, split="train")}


def test_sft_questions_never_ask_for_held_out_combinations():
    for r in make_interactions(2000, seed=0):
        m = re.search(r"What colour is (\w+)'s (\w+)\?$", r["query"])
        if m:
            assert r["answer"] in r["query"] and not is_test(m.group(1), "colour", r["answer"])


def test_gold_is_stated_before_the_probe_and_is_the_latest_value(train, test):
    for ep in train + test:
        p, slot, x = ep["name"], ep["slot"], ep["thing"]
        history = []  # every value stated for the probed slot, in order, over the turns before the probe
        for turn in episode_turns(ep)[:-1]:
            history += stated_values(turn["query"], p, slot, x)
            # the answers repeat the query; they must not say anything else about the slot
            assert stated_values(turn["answer"], p, slot, x) in ([], stated_values(turn["query"], p, slot, x))
        assert history and history[-1] == ep["gold"], ep
        if ep["kind"] == "overwrite":
            assert len(history) >= 2 and history[0] != ep["gold"]
        else:
            assert set(history) == {ep["gold"]}


def test_long_range_distractors_never_mention_the_probed_person(train):
    for ep in train:
        if ep["kind"] == "long-range":
            for turn in ep["interactions"][:-1]:
                for text in turn.values():
                    assert not re.search(rf"\b{ep['name']}\b", text), (ep["name"], text)
            assert ep["name"] in ep["query"]


def test_cumulative_turns_add_facts_about_the_same_person(train):
    for ep in train:
        if ep["kind"] == "cumulative":
            for turn in episode_turns(ep)[:-1]:
                assert turn["query"].startswith(ep["name"])


def test_world_uses_a_small_vocabulary():
    words = Counter(w.lower() for s in make_stories(500, 0) for w in re.findall(r"[A-Za-z]+", s))
    assert len(words) < 400 and set(NAMES) <= {w.capitalize() for w in words}


def test_jsonl_round_trip(tmp_path):
    records = make_episodes(10, seed=0)
    write_jsonl(records, str(tmp_path / "e.jsonl"))
    assert read_jsonl(str(tmp_path / "e.jsonl")) == records
    assert not (tmp_path / "e.jsonl.tmp").exists()


def test_build_world_writes_every_file_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "world")
    build_world(out, seed=0, n_stories=300, n_interactions=200, n_episodes=150, n_test_episodes=30, vocab_size=400)
    names = ["stories.txt", "interactions.jsonl", "episodes_train.jsonl", "episodes_test.jsonl",
             "incontext_test.jsonl", "span_test.jsonl", "binding_test.jsonl", "paraphrase_test.jsonl",
             "paraphrase_questions_test.jsonl",
             "tokenizer.tiktoken", "train.bin", "val.bin"]
    assert sorted(os.listdir(out)) == sorted(names)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.tiktoken"))
    assert tok.vocab_size == 400
    ids = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16).tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(tok.bos_id) == ids.count(tok.eos_id) == 15  # 5% of the stories
    assert len(read_jsonl(os.path.join(out, "episodes_test.jsonl"))) == 30
    binding = read_jsonl(os.path.join(out, "binding_test.jsonl"))
    assert binding and all(ep["binding"] and ep["kind"] == "long-range" and is_test(ep["name"], ep["slot"], ep["gold"])
                           for ep in binding)
    mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in names}
    capsys.readouterr()
    build_world(out, seed=0, n_stories=300, n_interactions=200, n_episodes=150, n_test_episodes=30, vocab_size=400)
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in names} == mtimes
    assert "skipping" in capsys.readouterr().out


def test_binding_questions_give_one_slot_to_two_people_and_ask_for_one():
    for r in make_incontext(200, seed=3, split="test"):
        facts = [f for f in re.split(r"(?<=\.) ", r["query"]) if not f.endswith("?")]
        assert len(facts) == 2 and r["query"].endswith(probe_text(r["name"], r["slot"], r["thing"]))
        mine = [f for f in facts if f.startswith(r["name"])]
        other = [f for f in facts if f not in mine]
        assert len(mine) == 1 and r["gold"] in re.findall(r"\w+", mine[0])
        assert r["gold"] not in re.findall(r"\w+", other[0])  # the other person has another value
        assert is_test(r["name"], r["slot"], r["gold"]) and r["distance"] == 0 and r["interactions"] == []


def test_episodes_mark_the_binding_case():
    episodes = make_episodes(300, seed=4)
    binding = [ep for ep in episodes if ep["binding"]]
    assert 0.2 < len(binding) / len(episodes) < 0.5
    for ep in binding:  # turn 1 gives the probed slot to someone else too, with another value
        slot_things = SLOTS[ep["slot"]]["fact"].split("{p}")[1].split("{v}")[0].format(x=ep["thing"]).strip()
        others = [n for n in NAMES if n != ep["name"] and n in ep["query"]]
        assert ep["kind"] != "cumulative" and others and slot_things in ep["query"]


def test_span_episodes_tell_k_facts_in_each_layout_and_ask_for_one_held_out():
    episodes = make_span(20, seed=5, ks=(1, 3, 8))
    assert len(episodes) == 4 * 3 * 20
    for ep in episodes:
        turns = episode_turns(ep)
        told = [f for t in turns[:-1] for f in re.split(r"(?<=\.) ", t["query"])]
        assert len(told) == ep["k"] and ep["layout"] in SPAN_LAYOUTS
        assert len(turns) - 1 == (1 if ep["layout"].startswith("one turn") else ep["k"]) == ep["distance"]
        people = {n for f in told for n in re.findall(r"\w+", f)[:1]}
        assert len(people) == (1 if "one person" in ep["layout"] else ep["k"])
        assert turns[-1]["query"] == probe_text(ep["name"], ep["slot"], ep["thing"]) and turns[-1]["answer"] == ep["gold"]
        assert stated_values(" ".join(told), ep["name"], ep["slot"], ep["thing"]) == [ep["gold"]]
        assert is_test(ep["name"], ep["slot"], ep["gold"])
    assert all(not is_test(ep["name"], ep["slot"], ep["gold"]) for ep in make_span(5, seed=5, split="train"))


def templates(kind):
    """Regexes of the sentences of one kind of PHRASINGS, any person, thing and value."""
    return [re.compile(re.escape(t).replace(r"\{p\}", r"\w+").replace(r"\{x\}", r"\w+").replace(r"\{v\}", r"\w+")
                       .replace(r"\ a\ ", r"\ an?\ ")) for spec in PHRASINGS.values() for t in spec[kind]]


def test_paraphrase_rows_reword_the_test_episodes_with_phrasings_training_never_uses():
    style = dict(acks_only=True, binding=0.0)
    own = make_episodes(150, seed=6, split="test", **style)
    reworded = make_episodes(150, seed=6, split="test", phrasing="held-out", **style)
    questions = make_episodes(150, seed=6, split="test", phrasing="held-out-questions", **style)
    held_facts, held_probes = templates("facts_held_out"), templates("probes_held_out")
    for a, b, c in zip(own, reworded, questions):
        key = lambda ep: (ep["name"], ep["slot"], ep["thing"], ep["gold"], ep["distance"], ep["kind"])
        assert key(a) == key(b) == key(c)  # the same draws
        probe_b, probe_c = b["interactions"][-1]["query"], c["interactions"][-1]["query"]
        assert probe_b == probe_c != a["interactions"][-1]["query"] and any(t.fullmatch(probe_b) for t in held_probes)
        assert c["query"] == a["query"] and b["query"] != a["query"]  # facts reworded in one, kept in the other
        assert any(t.search(b["query"]) for t in held_facts) and ep_answerable(b)
    training = make_episodes(300, seed=7, phrasing="varied", **style) + make_interactions(300, 7, phrasing="varied")
    text = " ".join(s for r in training for s in [r["query"], r["answer"]] +
                    [x for t in r.get("interactions", []) for x in (t["query"], t["answer"])])
    assert not any(t.search(text) for t in held_facts + held_probes)  # training never sees a held-out phrasing
    assert sum(bool(t.search(text)) for t in templates("facts") + templates("probes")) >= 20  # it does see the varied


def ep_answerable(ep):
    """The gold word is stated in the episode's first turn or a later one (a change), as a whole word."""
    told = " ".join([ep["query"]] + [t["query"] for t in ep["interactions"][:-1]])
    return ep["gold"] in re.findall(r"\w+", told)


def test_nobody_is_their_own_best_friend():
    rng = random.Random(0)
    assert all(random_value(rng, p, "friend") != p for p in NAMES for _ in range(100))


def test_a_question_turn_gives_a_person_one_value_per_slot():
    rng = random.Random(0)
    for _ in range(500):
        query = question_turn(rng, names=["Mia", "Tom"])["query"]
        keys = re.findall(r"(\w+) has an? \w+ (\w+)\.", query) + re.findall(r"(\w+)('s favourite food) is", query) \
            + re.findall(r"(\w+) is at (the) ", query) + re.findall(r"(\w+)('s best friend) is", query)
        assert len(keys) == len(set(keys)), query


def test_train_bin_holds_the_training_stories_only(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    stories = list(iter_stories(os.path.join(world, "stories.txt")))
    n_val = max(1, int(len(stories) * 0.05))
    want = sum(len(ids) + 2 for ids in tok.encode_batch(stories[:-n_val]))
    assert os.path.getsize(os.path.join(world, "train.bin")) // 2 == want


def test_an_overwrite_is_told_as_a_change_of_the_fact_not_as_a_second_fact():
    # "Now Mia's ball is blue." says the old value no longer holds; a plain "Mia has a blue ball." would not
    for ep in make_episodes(200, 6, distances=(1, 4), kinds=("overwrite",)):
        told = " ".join(t["query"] for t in episode_turns(ep)[:-1])
        changes = [articles(c.format(p=ep["name"], x=ep["thing"], v=ep["gold"])) for c in SLOTS[ep["slot"]]["change"]]
        assert any(c in told for c in changes), (told, changes)


def test_an_overwrite_episodes_rival_is_the_value_before_the_last_change():
    eps = make_episodes(300, 5, distances=(4, 8), kinds=("overwrite",))
    twice = 0
    for ep in eps:
        p, values = ep["name"], SLOTS[ep["slot"]]["values"]
        # the later turns that name the person are the changes (the others are about other people)
        changes = [[v for v in values if v != p and re.search(rf"\b{v}\b", t["query"])]
                   for t in ep["interactions"][:-1] if re.search(rf"\b{p}\b", t["query"])]
        assert all(len(c) == 1 for c in changes) and changes[-1] == [ep["gold"]]
        if len(changes) == 2:  # told, changed, changed again: the rival is the first change's value
            twice += 1
            assert ep["rivals"]["overwrite"] == changes[0][0]
    assert twice > 50


def test_the_worlds_val_bin_holds_the_last_stories_and_train_bin_the_others(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    stories = list(iter_stories(os.path.join(world, "stories.txt")))
    bins = {s: np.fromfile(os.path.join(world, f"{s}.bin"), dtype=np.uint16).tolist() for s in ("train", "val")}
    n_val = bins["val"].count(tok.bos_id)
    assert 0 < n_val < len(stories) and bins["train"].count(tok.bos_id) == len(stories) - n_val
    first_val = stories[-n_val]
    assert bins["val"][1:1 + len(tok.encode(first_val))] == tok.encode(first_val)
    assert bins["train"][1:1 + len(tok.encode(stories[0]))] == tok.encode(stories[0])


def test_the_probed_fact_is_told_first_or_second_in_turn_one(train):
    """Where the question's fact stands among turn 1's two facts is drawn: a model cannot learn 'the first one'."""
    firsts = [ep["gold"] in ep["query"].split(". ")[0] for ep in train if ep["kind"] == "long-range"]
    assert len(firsts) > 50 and 0.3 < sum(firsts) / len(firsts) < 0.7


@pytest.mark.parametrize("echo", [False, True])
def test_the_world_cli_acknowledges_facts_unless_asked_to_echo_them(tmp_path, echo):
    out = tmp_path / "w"
    memory_world.main([f"--out_dir={out}", "--n_stories=100", "--n_interactions=50", "--n_episodes=300", "--n_test_episodes=30",
          "--vocab_size=300"] + (["--echo"] if echo else []))
    eps = [json.loads(line) for line in open(out / "episodes_train.jsonl")]
    answers = [ep["answer"] for ep in eps]
    assert all((a in memory_world.ACKS) != echo for a in answers)
    if echo:
        assert all(ep["answer"].startswith(ep["query"]) for ep in eps)
