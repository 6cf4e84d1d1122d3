"""Contracts of the data side: the BPE tokenizer and its files, the TinyStories preparation, the memory world's
generators, files and CLI, and the RxNN/RxLM converter's checks and report. Each test pins behaviours another module
or a user relies on (a value, a message, a file, what a flag changes), with tiny inputs and hand-computed answers."""

import json
import os
import random
import re
import shutil
import threading
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import cli
import convert_rxnn
from data import memory_world, tinystories
from data import tokenizer as tokenizer_module
from data.memory_world import (ACKS, CHAT, GIRLS, KEYS, NAMES, SLOTS, articles, build_world, distractor_turn,
                               episode_text, fact_text, is_test, make_episodes, make_incontext, make_interactions,
                               make_span, probe_text, question_turn, random_value, read_jsonl, story_turn,
                               write_jsonl)
from data.tinystories import SEPARATOR, download, sample_text, tokenize_to_bin
from data.tokenizer import Tokenizer, bytes_to_unicode, load_ranks, read_texts, save_ranks, train_bpe

BYTES = {bytes([i]): i for i in range(256)}  # the smallest tokenizer: single bytes, no merges


# -----------------------------------------------------------------------------
# data/tokenizer.py


def test_train_bpe_stops_when_the_text_runs_out_of_pairs_and_says_how_big_the_vocab_is(capsys):
    # "ab" and " ab": merge (a, b), then (" ", ab); nothing is left to merge after 2 merges
    ranks = train_bpe(["ab ab"], 300, verbose=True)
    assert ranks == {**BYTES, b"ab": 256, b" ab": 257}
    out = capsys.readouterr().out
    assert "after 2 merges" in out and "the vocab is 266 instead of 300" in out
    # the smallest vocab (the bytes and the 8 specials) learns no merge at all, and is allowed
    assert train_bpe(["abab abab"], 264, verbose=False) == BYTES


def test_tiktoken_files_are_written_in_rank_order_and_read_back_strictly(tmp_path):
    path = str(tmp_path / "t.tiktoken")
    save_ranks(path, {b"zz": 256, **BYTES, b"aa": 257})  # rank order differs from the bytes' order
    lines = open(path).read().splitlines()
    assert [int(line.split()[1]) for line in lines] == list(range(258)) and lines[256] == "eno= 256"
    # blank lines are skipped
    with open(path, "w") as f:
        f.write("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n\n")
    assert load_ranks(path) == {**BYTES, b"zz": 256, b"aa": 257}
    # a token that is not strict base64 is refused, naming the file and its line (1-based)
    bad = lines[:65] + ["QQ$$== 65"] + lines[66:]  # rank 65 is b"A" = "QQ==", with junk in it
    with open(path, "w") as f:
        f.write("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=r"t\.tiktoken:66: not a \.tiktoken line"):
        load_ranks(path)
    # ranks must be 0..N-1 without a gap
    save_ranks(path, {**BYTES, b"ab": 257})
    with pytest.raises(ValueError, match="ranks must be 0..N-1"):
        load_ranks(path)


def test_encode_batch_is_encode_per_text_and_decode_never_crashes():
    tok = Tokenizer(BYTES)
    texts = ["[Q] hi [EOS] <|endoftext|>", "caf\u00e9"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts] == [list(t.encode()) for t in texts]
    # ids outside 0..vocab_size-1 (a padded embedding; a negative one) read as [UNK], a cut character as U+FFFD
    assert tok.decode([-1, tok.vocab_size]) == "[UNK][UNK]"
    assert tok.decode(list("\U0001F600".encode())[:2] + [ord("x")]) == "\ufffdx"


def test_bytes_to_unicode_is_gpt2s_byte_level_alphabet():
    m = bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord("!")] == "!" and m[ord("~")] == "~" and m[0xA1] == "\u00a1" and m[0xFF] == "\u00ff"
    # the others take 256, 257, ... in byte order: 0..32, then 127..160, then the soft hyphen 0xAD
    assert (m[0], m[10], m[32], m[127], m[160], m[0xAD]) == ("\u0100", "\u010a", "\u0120", "\u0121", "\u0142",
                                                               "\u0143")


def test_read_texts_reads_every_file_and_stops_at_max_bytes_after_finishing_the_line(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello brave new world\n" * 100)  # 22 characters a line
    b.write_text("second file\n" * 10)
    assert "".join(read_texts([str(a), str(b)])) == a.read_text() + b.read_text()
    # 50 characters, then the rest of the third line: 66; the budget is spent, the second file is not read
    assert list(read_texts([str(a), str(b)], max_bytes=50)) == ["hello brave new world\n" * 3]


def hf_tokenizer(tmp_path, change):
    """The fixture's tokenizer.json, changed by change(j), written to tmp_path."""
    j = json.load(open(os.path.join(FIXTURE, "rxnn", "decoder", "tokenizer.json")))
    change(j)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(j))
    return str(path)


@pytest.mark.parametrize("change, words", [
    (lambda j: j["model"].update(type="WordPiece"), "model type 'WordPiece' (only BPE)"),
    (lambda j: j["pre_tokenizer"].update(use_regex=False), "pre-tokenizer 'ByteLevel'"),
    (lambda j: j.update(normalizer={"type": "NFC"}), "a normalizer is not supported"),
    (lambda j: j["model"].update(dropout=0.1), "dropout is not supported"),
    (lambda j: j["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda j: j.update(added_tokens=[t for t in j["added_tokens"] if t["content"] != "[A]"]),
     "no [A] among its added tokens"),
    (lambda j: j["model"]["vocab"].update({"\u4e2d": 112}), "vocab entry '\u4e2d' is not in the byte-level alphabet"),
    (lambda j: j["model"]["vocab"].update({max(j["model"]["vocab"], key=j["model"]["vocab"].get): 200}),
     "ids are not 0..N-1"),
])
def test_from_hf_json_refuses_what_is_not_plain_byte_level_bpe(tmp_path, change, words):
    with pytest.raises(ValueError) as e:
        Tokenizer.from_hf_json(hf_tokenizer(tmp_path, change))
    assert words in str(e.value) and "tokenizer.json" in str(e.value)


def test_the_tokenizer_cli_trains_on_at_most_max_bytes_and_reports_bytes_per_token(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("ab ab ab\n" * 20 + "caf\u00e9 xy xy\n" * 200)
    out = str(tmp_path / "t.tiktoken")
    tokenizer_module.main(["--input", str(text), "--vocab_size", "300", "--out", out, "--max_bytes", "30"])
    ranks = load_ranks(out)
    assert b"ab" in ranks and b"xy" not in ranks and b" xy" not in ranks  # only the first 36 characters were read
    tokenizer_module.main(["--input", str(text), "--vocab_size", "300", "--out", out])
    tok = Tokenizer.from_file(out)
    assert b" xy" in tok.ranks
    n_bytes, n_tokens = len(text.read_bytes()), len(tok.encode(text.read_text()))
    printed = capsys.readouterr().out
    assert f"vocab {tok.vocab_size} -> {out}" in printed
    assert f"{n_bytes / n_tokens:.2f} bytes/token on the input ({n_tokens:,} tokens)" in printed
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(cli.UserError, match="no text to learn from"):
        tokenizer_module.main(["--input", str(empty), "--out", out])
    with pytest.raises(cli.ConfigError, match="max_bytes"):
        tokenizer_module.main(["--input", str(text), "--out", out, "--max_bytes", "0"])


# -----------------------------------------------------------------------------
# data/tinystories.py


class Refuses416(BaseHTTPRequestHandler):
    """Answers a Range request with 416 (the .part is no prefix it can continue) and a plain one with the file."""
    ranges = []

    def do_GET(self):
        Refuses416.ranges.append(self.headers.get("Range"))
        if self.headers.get("Range"):
            self.send_error(416, "range not satisfiable")
            return
        self.send_response(200)
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b"hello world")

    def log_message(self, *args):
        pass


def test_a_download_whose_part_the_server_cannot_continue_starts_over(tmp_path):
    Refuses416.ranges = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Refuses416)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        dest = tmp_path / "f.txt"
        (tmp_path / "f.txt.part").write_bytes(b"longer than the whole file")
        download(f"http://127.0.0.1:{httpd.server_address[1]}/f", str(dest))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert dest.read_bytes() == b"hello world" and not (tmp_path / "f.txt.part").exists()
    assert Refuses416.ranges == ["bytes=26-", None]


def test_tokenize_to_bin_writes_uint16_up_to_65535_ids_and_reports_the_tokens(tmp_path, capsys):
    fake = types.SimpleNamespace(vocab_size=65536, bos_id=65533, eos_id=65534,
                                 encode_batch=lambda texts: [[len(t)] * len(t) for t in texts])
    with pytest.raises(AssertionError, match="uint16"):
        tokenize_to_bin(["ab"], fake, str(tmp_path / "a.bin"))
    assert not os.listdir(tmp_path)
    fake.vocab_size = 65535
    tokenize_to_bin(["ab", "c"], fake, str(tmp_path / "b.bin"))
    assert np.fromfile(tmp_path / "b.bin", dtype=np.uint16).tolist() == [65533, 2, 2, 65534, 65533, 1, 65534]
    assert f"wrote 7 tokens to {tmp_path / 'b.bin'}" in capsys.readouterr().out


def test_sample_text_takes_the_first_stories_until_their_utf8_bytes_reach_the_budget():
    assert sample_text(iter(["aa", "bb", "cc"]), 4) == ["aa", "bb"]  # exactly the budget: stop there
    assert sample_text(iter(["aa", "bb", "cc"]), 5) == ["aa", "bb", "cc"]
    assert sample_text(iter(["\u00e9\u00e9", "b", "c"]), 4) == ["\u00e9\u00e9"]  # 2 characters, 4 bytes
    assert sample_text(iter([]), 4) == []


def write_story_file(path, stories):
    path.write_text(f"\n{SEPARATOR}\n".join(stories) + "\n")
    return str(path)


def test_prepare_downloads_both_files_learns_from_the_train_sample_and_caps_both_bins(tmp_path, monkeypatch,
                                                                                      capsys):
    train = write_story_file(tmp_path / "train.txt", [f"Mia had {i} red balls." for i in range(20)])
    valid = write_story_file(tmp_path / "valid.txt", [f"Tom saw a big dog {i}." for i in range(5)])
    fetched, learned = [], []
    monkeypatch.setattr(tinystories, "download", lambda url, dest: fetched.append((url, dest)) or
                        (train if url.endswith("train.txt") else valid))
    real_train_bpe = tinystories.train_bpe
    monkeypatch.setattr(tinystories, "train_bpe", lambda texts, vocab: learned.append((texts, vocab)) or
                        real_train_bpe(texts, vocab, verbose=False))
    out = str(tmp_path / "ts")
    tinystories.prepare(out, vocab_size=280, max_stories=2, tokenizer_sample_bytes=40)
    assert fetched == [(tinystories.URL_BASE + "TinyStoriesV2-GPT4-train.txt", os.path.join(out, tinystories.TRAIN_FILE)),
                       (tinystories.URL_BASE + "TinyStoriesV2-GPT4-valid.txt", os.path.join(out, tinystories.VALID_FILE))]
    # the first training stories until 40 bytes are reached (20 + 20), and the vocab asked for
    assert learned == [(["Mia had 0 red balls.", "Mia had 1 red balls."], 280)]
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.tiktoken"))
    for split, first in (("train", "Mia had 0 red balls."), ("val", "Tom saw a big dog 0.")):
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16).tolist()
        assert ids.count(tok.bos_id) == 2 and ids[1:1 + len(tok.encode(first))] == tok.encode(first)
    capsys.readouterr()
    tinystories.prepare(out, vocab_size=280, train_path=train, valid_path=valid)  # everything there: skipped
    assert len(learned) == 1 and "exists, skipping tokenizer training" in capsys.readouterr().out


def test_the_tinystories_cli_passes_its_flags_to_prepare_and_checks_their_bounds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tinystories, "prepare", lambda *args: calls.append(args))
    train, valid = write_story_file(tmp_path / "t.txt", ["a"]), write_story_file(tmp_path / "v.txt", ["b"])
    tinystories.main(["--out_dir", "o"])
    tinystories.main(["--out_dir", "o", "--vocab_size", "264", "--train_path", train, "--valid_path", valid,
                      "--max_stories", "1", "--tokenizer_sample_bytes", "1000"])
    assert calls == [("o", 7500, None, None, None, 20_000_000), ("o", 264, train, valid, 1, 1000)]
    for flag, value in (("--vocab_size", "263"), ("--max_stories", "0"), ("--tokenizer_sample_bytes", "999")):
        with pytest.raises(cli.ConfigError, match=flag[2:]):
            tinystories.main(["--out_dir", "o", flag, value])
    assert len(calls) == 2


# -----------------------------------------------------------------------------
# data/memory_world.py


def test_about_one_in_five_name_slot_value_combinations_are_held_out():
    combos = [(p, slot, v) for p in NAMES for slot, spec in SLOTS.items() for v in spec["values"]]
    share = sum(is_test(*c) for c in combos) / len(combos)
    assert len(combos) == 40 * 99 and 0.17 < share < 0.23


def test_articles_turn_a_into_an_only_before_a_lowercase_vowel_and_only_for_the_word_a():
    assert articles("A apple, a orange kite, a red ball, banana apple, an egg, a Uber.") == \
        "An apple, an orange kite, a red ball, banana apple, an egg, a Uber."


def test_a_story_is_about_its_hero_with_another_friend_and_the_heros_kind_of_kid():
    rng = random.Random(0)
    girls = 0
    for _ in range(300):
        p = rng.choice(["Mia", "Tom"])
        s = make_story(rng, ["Mia", "Tom"], p)
        assert p in s.split(".")[0] and ("boy" if p in GIRLS else "girl") not in s, s
        assert f"{p} and {p}" not in s and f"{p} was {p}'s" not in s and f"Thank you, {p}!" not in s, s
        girls += "girl" in s
    assert girls > 50


def make_story(rng, names, p):
    return memory_world.make_story(rng, names, p)


def test_a_story_request_about_someone_gets_a_story_that_starts_with_them():
    rng = random.Random(1)
    turns = [story_turn(rng) for _ in range(300)]
    about = [t for t in turns if t["query"].startswith("Tell me a story about ")]
    assert 100 < len(about) < 200  # about half name someone
    for t in about:
        assert t["query"][len("Tell me a story about "):-1] in t["answer"].split(".")[0]


def fact_sentences(query):
    return [f for f in re.split(r"(?<=[.?]) ", query) if not f.endswith("?")]


def asked(query, people):
    """(person, slot, thing) of the question that ends query (canonical phrasing)."""
    found = [(p, slot, x) for p in people for slot, x in KEYS if query.endswith(probe_text(p, slot, x))]
    assert len(found) == 1, query
    return found[0]


def test_binding_question_turns_follow_their_share_and_split():
    rng = random.Random(2)
    for _ in range(100):  # binding=1: always two people, one slot, and the asked value is held out for "test"
        r = question_turn(rng, split="test", binding=1.0)
        facts = fact_sentences(r["query"])
        people = [f.split()[0].removesuffix("'s") for f in facts]
        assert len(facts) == 2 and people[0] != people[1], r
        p, slot, _ = asked(r["query"], people)
        assert is_test(p, slot, r["answer"]) and r["answer"] in re.findall(r"\w+", facts[people.index(p)])
    counts = Counter(len(fact_sentences(question_turn(rng, binding=0.0)["query"])) for _ in range(200))
    assert set(counts) == {1, 2, 3}


def test_an_in_context_rows_asked_fact_is_told_first_or_second():
    rows = make_incontext(200, seed=3)
    first = [fact_sentences(r["query"])[0].startswith(r["name"]) for r in rows]
    assert 0.3 < sum(first) / len(first) < 0.7


def test_span_episodes_probe_every_position_among_the_k_facts():
    for layout_start in (0, 40):  # turns, one person / turns, several people
        eps = make_span(40, seed=4, ks=(4,))[layout_start:layout_start + 40]
        where = Counter()
        for ep in eps:
            told = [t["query"] for t in [ep] + ep["interactions"][:-1]]
            where[told.index(fact_text(ep["name"], ep["slot"], ep["thing"], ep["gold"]))] += 1
        assert set(where) == {0, 1, 2, 3}, where


def classify(r):
    if (r["query"], r["answer"]) in CHAT:
        return "chat"
    if r["query"].startswith(("Tell me a", "Can you tell me")):
        return "story"
    return "question" if r["query"].endswith("?") else "tell"


@pytest.mark.parametrize("acks_only", [True, False])
def test_interactions_mix_their_kinds_and_follow_the_style(acks_only):
    records = make_interactions(1000, seed=5, acks_only=acks_only, binding=1.0)
    kinds = Counter(classify(r) for r in records)
    for kind, share in (("tell", 0.3), ("question", 0.4), ("story", 0.15), ("chat", 0.15)):
        assert abs(kinds[kind] / 1000 - share) < 0.05, kinds
    for r in records:
        if classify(r) == "tell":
            ack = r["answer"] if acks_only else r["answer"][len(r["query"]) + 1:]
            assert ack in ACKS and (acks_only or r["answer"].startswith(r["query"] + " ")), r
        elif classify(r) == "question":  # binding=1: every question gives one slot to two people
            assert len(fact_sentences(r["query"])) == 2, r


def test_distractor_turns_mix_facts_questions_stories_and_chat_about_the_given_people():
    rng = random.Random(6)
    turns = [distractor_turn(rng, ["Tom", "Ben"]) for _ in range(1000)]
    kinds = Counter(classify(t) for t in turns)
    for kind, share in (("tell", 0.45), ("question", 0.3), ("story", 0.15), ("chat", 0.1)):
        assert abs(kinds[kind] / 1000 - share) < 0.05, kinds
    assert not any(re.search(rf"\b{n}\b", t["query"] + t["answer"]) for t in turns for n in NAMES
                   if n not in ("Tom", "Ben"))


def test_best_friends_come_from_the_given_people_and_avoid_what_is_asked():
    rng = random.Random(7)
    assert {random_value(rng, "Mia", "friend", people=["Mia", "Tom", "Ben"]) for _ in range(50)} == {"Tom", "Ben"}
    assert {random_value(rng, "Mia", "colour", avoid=SLOTS["colour"]["values"][1:]) for _ in range(20)} == {"red"}
    with pytest.raises(AssertionError):
        make_episodes(3, seed=0, split="valid")


def test_jsonl_files_are_utf8_text_in_new_folders_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "new" / "deeper" / "r.jsonl"
    write_jsonl([{"q": "caf\u00e9"}, {"q": 2}], str(path))
    assert path.read_bytes() == '{"q": "caf\u00e9"}\n{"q": 2}\n'.encode("utf-8")
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl(str(path)) == [{"a": 1}, {"a": 2}]


def test_episode_text_lists_every_query_and_answer_in_order():
    ep = {"query": "q1", "answer": "a1", "interactions": [{"query": "q2", "answer": "a2"},
                                                         {"query": "q3", "answer": "a3"}]}
    assert episode_text(ep) == ["q1", "a1", "q2", "a2", "q3", "a3"]


def test_build_world_draws_each_file_from_its_seed_and_style_and_trains_on_all_the_text(tmp_path, monkeypatch,
                                                                                         capsys):
    learned = []
    real_train_bpe = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda texts, vocab: learned.append((texts, vocab)) or
                        real_train_bpe(texts, vocab, verbose=False))
    out = str(tmp_path / "w")
    style = dict(acks_only=True, binding=1.0, phrasing="varied")
    build_world(out, seed=3, n_stories=10, n_interactions=20, n_episodes=30, n_test_episodes=40, vocab_size=264,
                **style)
    read = lambda name: read_jsonl(os.path.join(out, name))
    test_style = dict(style, binding=0.0, phrasing="canonical")  # the test files ignore the training style
    assert read("interactions.jsonl") == make_interactions(20, 4, **style)
    assert read("episodes_train.jsonl") == make_episodes(30, 5, split="train", **style)
    assert read("episodes_test.jsonl") == make_episodes(40, 6, split="test", **test_style)
    assert read("incontext_test.jsonl") == make_incontext(4, 7, split="test")
    assert read("span_test.jsonl") == make_span(2, 8, split="test", **test_style)
    assert read("binding_test.jsonl") == [ep for ep in make_episodes(40, 9, kinds=("long-range",), split="test",
                                                                     **test_style) if ep["binding"]]
    for name, phrasing in (("paraphrase_test.jsonl", "held-out"), ("paraphrase_questions_test.jsonl",
                                                                   "held-out-questions")):
        assert read(name) == make_episodes(40, 6, split="test", **dict(test_style, phrasing=phrasing))
    # the tokenizer learns from the stories, the interactions and both episode splits, at the asked size
    stories = list(tinystories.iter_stories(os.path.join(out, "stories.txt")))
    want = stories + [s for r in read("interactions.jsonl") for s in (r["query"], r["answer"])] + \
        [s for name in ("episodes_train.jsonl", "episodes_test.jsonl") for ep in read(name) for s in episode_text(ep)]
    assert len(stories) == 10 and learned == [(want, 264)]
    assert "trained the tokenizer (vocab 264)" in capsys.readouterr().out
    # 10 stories at 5%: still one for val.bin (the last), nine for train.bin
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.tiktoken"))
    bins = {s: np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16).tolist() for s in ("train", "val")}
    assert bins["val"] == [tok.bos_id] + tok.encode(stories[-1]) + [tok.eos_id]
    assert bins["train"].count(tok.bos_id) == 9


def test_the_world_cli_passes_its_flags_and_defaults_and_checks_their_bounds(tmp_path, monkeypatch):
    calls = []

    def record(out_dir, *args, **style):
        os.makedirs(out_dir, exist_ok=True)
        calls.append((args, style))
    monkeypatch.setattr(memory_world, "build_world", record)
    out = str(tmp_path / "w")
    memory_world.main(["--out_dir", out])
    memory_world.main(["--out_dir", out, "--seed", "3", "--n_stories", "100", "--n_interactions", "50",
                       "--n_episodes", "300", "--n_test_episodes", "30", "--vocab_size", "264", "--binding", "1",
                       "--phrasing", "varied", "--echo"])
    assert calls == [((1337, 50_000, 20_000, 20_000, 2_000, 2048),
                      dict(acks_only=True, binding=0.5, phrasing="canonical")),
                     ((3, 100, 50, 300, 30, 264), dict(acks_only=False, binding=1.0, phrasing="varied"))]
    for flag, value in (("--n_stories", "99"), ("--n_interactions", "49"), ("--n_episodes", "299"),
                        ("--n_test_episodes", "29"), ("--vocab_size", "263"), ("--binding", "1.01")):
        with pytest.raises(cli.ConfigError, match=flag[2:]):
            memory_world.main(["--out_dir", out, flag, value])
    (tmp_path / "file").write_text("")
    with pytest.raises(cli.UserError, match="is a file, not a folder"):
        memory_world.main(["--out_dir", str(tmp_path / "file")])
    assert len(calls) == 2


# -----------------------------------------------------------------------------
# convert_rxnn.py

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rxnn_fixture")


def write_f32_safetensors(path, tensors):
    """A minimal safetensors writer (fp32 only): 8-byte header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = t.float().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def components(tmp_path, kind="rxnn", memattn=None):
    """Settings for convert_rxnn.convert over a copy of the fixture that a test may change."""
    shutil.copytree(os.path.join(FIXTURE, kind), tmp_path / "in")
    if memattn:
        shutil.rmtree(tmp_path / "in" / "memory_attention")
        shutil.copytree(os.path.join(FIXTURE, memattn, "memory_attention"), tmp_path / "in" / "memory_attention")
    roles = ("encoder", "decoder", "memory_attention") + (("mlm_head",) if kind == "rxnn" else ())
    return dict(convert_rxnn.DEFAULTS, **{r: str(tmp_path / "in" / r) for r in roles})


def change(cfg, role, config=None, drop_keys=(), add=None, drop=None):
    """Edit one component of cfg: config values set or removed, tensors added or dropped (by a test on the name)."""
    d = cfg[role]
    c = json.load(open(os.path.join(d, "config.json")))
    c = {k: v for k, v in {**c, **(config or {})}.items() if k not in drop_keys}
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
    if add or drop:
        w = convert_rxnn.read_safetensors(os.path.join(d, "model.safetensors"), role)
        write_f32_safetensors(os.path.join(d, "model.safetensors"),
                              {k: v for k, v in {**w, **(add or {})}.items() if not (drop and drop(k))})


def refusal(cfg):
    with pytest.raises(cli.CheckpointError) as e:
        convert_rxnn.convert(cfg)
    return str(e.value)


def test_read_safetensors_calls_a_header_that_is_not_an_object_or_lacks_offsets_damaged(tmp_path):
    path = tmp_path / "t.safetensors"
    for header, words in (([1, 2], "not a safetensors file"),
                          ({"x": {"dtype": "F32", "shape": [1], "data_offsets": 4}}, "damaged (tensor x has no"),
                          ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "damaged (tensor x has no")):
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(4))
        with pytest.raises(cli.CheckpointError, match=re.escape(words)):
            convert_rxnn.read_safetensors(str(path), "encoder")


def test_a_component_directory_needs_its_config_and_both_halves_of_an_mlm_head(tmp_path):
    d = tmp_path / "mlm"
    d.mkdir()
    write_f32_safetensors(str(d / "model.safetensors"), {"dense.weight": torch.zeros(2, 2)})
    with pytest.raises(cli.CheckpointError, match="mlm_head: config.json not found"):
        convert_rxnn.Component("mlm_head", str(d))
    (d / "config.json").write_text("[1]")
    with pytest.raises(cli.CheckpointError, match="config.json is not a JSON object"):
        convert_rxnn.Component("mlm_head", str(d))
    (d / "config.json").write_text("{}")
    with pytest.raises(cli.CheckpointError, match="holds no RxT component I know, not an MLM head"):
        convert_rxnn.Component("mlm_head", str(d))
    write_f32_safetensors(str(d / "model.safetensors"), {"dense.weight": torch.zeros(2, 2),
                                                         "decoder.weight": torch.zeros(2, 2)})
    assert convert_rxnn.Component("mlm_head", str(d)).kind() == "mlm_head"


def test_config_settings_take_the_library_defaults_and_must_be_positive_numbers(tmp_path):
    cfg = components(tmp_path)
    change(cfg, "decoder", drop_keys=["moe_top_k"], config=dict(seq_len=32))
    model = convert_rxnn.convert(cfg)[0]
    assert model.cfg.top_k == 1 and model.cfg.seq_len == 32  # RxNN's default top-1; the decoder's seq_len
    for role in ("encoder", "decoder", "memory_attention"):
        change(cfg, role, drop_keys=["att_heads"])  # the library's 16 heads: a head size of 1
    assert "embed_dim 16 / att_heads 16: RoPE needs an even head size" in refusal(cfg)
    change(cfg, "encoder", config=dict(att_heads=1))
    for role in ("decoder", "memory_attention"):
        change(cfg, role, config=dict(att_heads=1))
    assert "k_proj.weight has 8 rows, not a multiple of the head size 16" in refusal(cfg)
    change(cfg, "encoder", config=dict(num_layers=True))
    assert "num_layers=true in config.json: not a positive number" in refusal(cfg)


def test_known_config_keys_and_values_are_accepted_and_other_values_refused(tmp_path):
    cfg = components(tmp_path, memattn="memattn_simple")
    for role in ("encoder", "decoder"):
        change(cfg, role, config=dict(att_dropout=0.1, ff_dropout=0.1, router_amp=True, ff_activation="swish",
                                      use_gated_cross_attention=None, stateless_layers_config=[], self_att_type="gqa"))
    change(cfg, "memory_attention", config=dict(norm_decay=0.5, att_dropout=0.1, residual_gate_init=1.0))
    assert convert_rxnn.convert(cfg)[0].cfg.gate_type == "static"
    change(cfg, "memory_attention", config=dict(norm_type="rms"))
    assert "norm_type=\"rms\" means a memory norm other than classic-rms" in refusal(cfg)
    change(cfg, "memory_attention", config=dict(norm_type="classic-rms", disable_residual=True))
    assert "disable_residual=true means a memory write without residual" in refusal(cfg)
    change(cfg, "memory_attention", config=dict(disable_residual=False))
    change(cfg, "decoder", config=dict(ff_activation="gelu"))
    assert "decoder" in refusal(cfg) and "other than SiLU" in refusal(cfg)


def test_the_memory_write_gate_none_static_or_per_slot_follows_the_config(tmp_path):
    cfg = components(tmp_path, memattn="memattn_simple")
    change(cfg, "memory_attention", config=dict(use_gated_residual=False), drop=lambda k: "gate" in k)
    assert convert_rxnn.convert(cfg)[0].cfg.gate_type == "none"
    shutil.rmtree(tmp_path / "in")
    cfg = components(tmp_path, memattn="memattn_self")
    change(cfg, "memory_attention", drop_keys=["residual_per_slot_gate"])  # per slot by default
    assert convert_rxnn.convert(cfg)[0].cfg.gate_type == "per-slot"
    change(cfg, "memory_attention", config=dict(residual_per_slot_gate=False))
    assert "elementwise residual gates per layer" in refusal(cfg)


@pytest.mark.parametrize("role, edit, words", [  # the refusal names the component edited
    ("decoder", dict(config=dict(stm_size=4)), "stm_size=4, the memory attention's is 8"),
    ("decoder", dict(config=dict(num_experts=3)), "num_experts=3 but the file holds 4 experts per layer"),
    ("decoder", dict(config=dict(use_head_norm=True)), "use_head_norm=true, but the file has no head norm"),
    ("mlm_head", dict(config=dict(embed_dim=32)), "its embed_dim / vocab_size are not the encoder's"),
    ("decoder", dict(add={"model.layers.0.ff.experts.0.fc1.weight": torch.zeros(8, 16)}), "non-gated feed-forward"),
    ("decoder", dict(drop=lambda k: k.startswith("model.layers.0.ff.experts.")), "a dense decoder feed-forward"),
    ("encoder", dict(add={"model.layers.0.memory_cross_attention.q_proj.weight": torch.zeros(16, 16)}),
     "an encoder with memory cross-attention"),
    ("encoder", dict(add={"model.layers.0.norm1.weight": torch.zeros(8)}),
     "model.layers.0.norm1.weight has shape (8,) where nanoRxT's encoder.layers.0.norm1.weight needs (16,)"),
    ("decoder", dict(add={"model.embedding.weight": torch.zeros(113, 16)}),
     "embedding (113, 16), the encoder's is (112, 16)"),
    ("decoder", dict(config=dict(rope_base=500)), "rope_base differs between the components: [500, 10000]"),
])
def test_components_that_disagree_with_each_other_or_their_weights_are_refused_by_name(tmp_path, role, edit, words):
    cfg = components(tmp_path)
    change(cfg, role, **edit)
    message = refusal(cfg)
    who = "memory_attention" if "rope_base" in words else role  # the one component that says which base it uses
    assert message.startswith(who) and words in message, message


def test_rope_convention_from_the_flag_or_the_files():
    part = lambda config=(), tensors=(): types.SimpleNamespace(config=dict.fromkeys(config, 1),
                                                               tensors=dict.fromkeys(tensors))
    enc, dec, mem = part(), part(), part()
    assert convert_rxnn.rope_convention(enc, dec, mem, "rxlm3") == ("rxlm3", "--rope")
    assert convert_rxnn.rope_convention(enc, dec, mem, "rxnn") == ("rxnn", "--rope")
    assert convert_rxnn.rope_convention(enc, dec, mem, "auto")[0] == "rxlm3"  # no STM buffer in the encoder
    stm = part(tensors=["model.stm.memory"])
    assert convert_rxnn.rope_convention(stm, dec, mem, "auto")[0] == "rxnn"
    assert convert_rxnn.rope_convention(stm, part(["legacy_stm_in_encoder"]), mem, "auto")[0] == "rxlm3"
    assert convert_rxnn.rope_convention(part(["legacy_stm_in_encoder"], ["model.stm.memory"]), dec, mem,
                                        "auto")[0] == "rxlm3"
    assert convert_rxnn.rope_convention(stm, dec, part(["rope_base"]), "auto")[0] == "rxlm3"


def test_a_per_layer_gate_is_repeated_for_every_slot():
    S = 3
    w = torch.tensor([[1.0, 2.0, 3.0]])  # Linear(S, 1): one row for the layer
    assert torch.equal(convert_rxnn.transform("gate", [w], (S, S), "rxnn", 8), w.expand(S, S))
    assert torch.equal(convert_rxnn.transform("gate", [torch.tensor([0.5])], (S, 1), "rxnn", 8),
                       torch.full((S, 1), 0.5))
    assert torch.equal(convert_rxnn.transform("gate", [torch.arange(3.0).view(S, 1)], (S,), "rxnn", 8),
                       torch.arange(3.0))
    assert torch.equal(convert_rxnn.transform("zeros", [], (2, 3), "rxnn", 8), torch.zeros(2, 3))


def test_the_tokenizer_defaults_to_the_decoders_and_must_fit_the_embedding(tmp_path):
    cfg = components(tmp_path)
    _, tok, rope, report = convert_rxnn.convert(cfg)
    assert tok is not None and tok.vocab_size == 112 and rope == "rxnn"
    assert report[1].startswith("experts: one per module (legacy); RoPE convention rxnn: the encoder stores")
    assert report[-1] == f"tokenizer: {os.path.join(cfg['decoder'], 'tokenizer.json')}"
    assert "MLM head" not in report[3]
    cfg["tokenizer"] = str(tmp_path / "nowhere.json")
    assert refusal(cfg) == f"tokenizer: {tmp_path / 'nowhere.json'} not found"
    cfg["tokenizer"] = hf_tokenizer(tmp_path, lambda j: j["added_tokens"].append(
        {"id": 112, "content": "[T]", "special": True}))
    assert refusal(cfg) == "tokenizer: 113 ids, the model has 112 embeddings"


def test_the_report_of_an_rxlm3_conversion_without_tokenizer_or_mlm_head(tmp_path):
    _, tok, rope, report = convert_rxnn.convert(components(tmp_path, "rxlm3"))
    assert tok is None and rope == "rxlm3"
    assert report[1].startswith("experts: stacked w1/w2 (rxlm >= 0.3.10); RoPE convention rxlm3: the memory-attention")
    assert report[3].endswith("; MLM head: none given, a fresh one (only MLM training reads it)")
    assert report[-1] == "tokenizer: none (chat.py and evaluate.py need one: --tokenizer=FILE)"


def test_the_converter_cli_records_absolute_sources_and_refuses_a_bad_embedding_choice(tmp_path, monkeypatch,
                                                                                       capsys):
    cfg = components(tmp_path, "rxlm3")
    monkeypatch.chdir(tmp_path)
    flags = [f"--{r}=in/{r}" for r in ("encoder", "decoder", "memory_attention")]
    with pytest.raises(SystemExit) as e:
        cli.run(convert_rxnn.main, [*flags, "--embedding=both", "--out=o.pt"])
    assert e.value.code == 2 and "embedding" in capsys.readouterr().err and not os.path.exists("o.pt")
    convert_rxnn.main([*flags, "--out=o.pt"])
    ckpt = torch.load("o.pt", weights_only=False)
    assert ckpt["config"]["sources"] == {r: cfg[r] for r in ("encoder", "decoder", "memory_attention")}
    assert "wrote o.pt: python chat.py --ckpt=o.pt" in capsys.readouterr().out
