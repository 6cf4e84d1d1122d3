import random
import re
from collections import Counter

import pytest
import tiktoken

from data.loaders import render_interaction, render_query
import cli
from data import tokenizer as tokenizer_module
from data.tokenizer import PAT_STR, SPECIAL_TOKENS, Tokenizer, load_ranks, read_texts, save_ranks, train_bpe

VARIED = [
    "Once upon a time, Mia had a red ball. She's happy; they'll play at 10:30!",
    "Numbers 1234567 and 3.14159, phone 555-0100, year 2024.",
    "Café naïve résumé, Ünïcödé façade — “quotes” and ‘single’ ones…",
    "Привет мир! Γειά σου κόσμε. 你好，世界。こんにちは世界。안녕하세요",
    "emoji 😀🎉 ❤️ 👍🏽 family 👨‍👩‍👧 flag 🇫🇷 keycap 1️⃣ done",
    "tabs\tand   spaces   \n\n\n  new lines \r\n  trailing   ",
    "snake_case_name = x__y + CamelCase; a+b=c? (yes) [no] {maybe} <tag/> #hash @at $5 %p ^ & * ~`|\\",
    "I'M YOU'RE WE'VE he'd she'll don't it's  'quoted'  ''  '''",
    "   leading spaces, and a lone \u00a0 no-break space\u2003em space, separators a \x1c b\x1dc",
]

# characters on which Python's re and Rust's regex disagree about \w or \s (see PAT_STR); encoding stays lossless
KNOWN_DIFFERENT = ["नमस्ते दुनिया", "x² + y² = ½"]

CORPUS = [
    "the cat sat on the mat. the dog sat on the log. a cat and a dog.",
    "Mia has a red ball. Tom has a blue kite. Mia and Tom play in the park.",
    "aaaa bbbb aaab abab baba 1111 2222 12 123 1234",
] * 3 + VARIED


def random_text(rng, n):
    alphabet = "abcdefg ABC  \n\t.,!?'0123456789éüßжλ中文😀❤️👍🏽\u200d"
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(train_bpe(CORPUS, 600, verbose=False))


def reference_bpe(texts, vocab_size):
    """Textbook BPE: recount every pair of every word before each merge."""
    words = Counter(p for t in texts for p in re.findall(PAT_STR, t))
    words = [(list(w.encode("utf-8")), c) for w, c in words.items()]
    ranks = {bytes([i]): i for i in range(256)}
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        counts = Counter()
        for ids, c in words:
            for pair in zip(ids, ids[1:]):
                counts[pair] += c
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        words = [(textbook_merge(ids, pair, ranks[merged]), c) for ids, c in words]
    return ranks


def textbook_merge(ids, pair, new_id):
    """The merge written independently of data.tokenizer: scan the word, join each pair found, skip past it."""
    out = list(ids)
    i = 0
    while i + 1 < len(out):
        if (out[i], out[i + 1]) == pair:
            out[i:i + 2] = [new_id]
        i += 1
    return out


def reference_encode(ranks, text):
    """tiktoken's algorithm in plain Python on the stdlib-re split: merge the lowest-ranked adjacent pair."""
    out = []
    for piece in re.findall(PAT_STR, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
            if parts[best] + parts[best + 1] not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        out += [ranks[p] for p in parts]
    return out


def tiktoken_splits_like_re(texts):
    """Give every piece of Python's re split its own rank: tiktoken then returns one token per piece iff its own
    (Rust) split produces exactly the same pieces."""
    ranks = {bytes([i]): i for i in range(256)}
    for text in texts:
        for piece in re.findall(PAT_STR, text):
            ranks.setdefault(piece.encode("utf-8"), len(ranks))
    enc = tiktoken.Encoding(name="split-test", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.encode_ordinary(t) == [ranks[p.encode("utf-8")] for p in re.findall(PAT_STR, t)] for t in texts]


def test_pattern_covers_every_character():
    for text in VARIED + KNOWN_DIFFERENT + [random_text(random.Random(0), 500)]:
        assert "".join(re.findall(PAT_STR, text)) == text


def test_stdlib_re_and_tiktoken_split_text_the_same_way():
    assert tiktoken_splits_like_re(VARIED) == [True] * len(VARIED)


def test_known_differences_are_still_known():
    # if tiktoken's regex engine ever agrees on these, move them to VARIED and update the PAT_STR comment
    assert tiktoken_splits_like_re(KNOWN_DIFFERENT) == [False] * len(KNOWN_DIFFERENT)


def test_tiktoken_matches_reference_encoder_on_stdlib_split(tok):
    rng = random.Random(1)
    for text in VARIED + CORPUS[:3] + [random_text(rng, 300) for _ in range(5)]:
        assert tok.encode(text) == reference_encode(tok.ranks, text), text


def test_round_trip_of_random_unicode_text(tok):
    rng = random.Random(0)
    for text in VARIED + KNOWN_DIFFERENT + [random_text(rng, 400) for _ in range(20)]:
        assert tok.decode(tok.encode(text)) == text


def test_trainer_picks_the_same_merges_as_textbook_bpe():
    for vocab_size in (280, 330, 400):
        assert train_bpe(CORPUS, vocab_size, verbose=False) == reference_bpe(CORPUS, vocab_size)


def test_vocab_size_is_exact_and_specials_follow_the_ranks():
    ranks = train_bpe(CORPUS * 5, 350, verbose=False)
    tok = Tokenizer(ranks)
    assert len(ranks) == 350 - len(SPECIAL_TOKENS) and tok.vocab_size == 350
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(ranks[bytes([i])] == i for i in range(256))
    ids = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.q_id, tok.a_id, tok.t_id]
    assert ids == list(range(len(ranks), len(ranks) + 8))
    assert tok.decode(ids) == "".join(SPECIAL_TOKENS)


def test_ids_past_the_vocabulary_decode_and_stream_as_unk():
    """A padded embedding lets the model sample ids the tokenizer lacks: text and streamed bytes both read [UNK]."""
    tok = Tokenizer(train_bpe(CORPUS, 300, verbose=False))
    ids = tok.encode("a cat") + [tok.vocab_size, tok.vocab_size + 7, -1]
    assert tok.decode(ids) == "a cat[UNK][UNK][UNK]"
    assert tok.decode_bytes(ids) == b"a cat[UNK][UNK][UNK]"


def test_user_text_never_becomes_a_special_token(tok):
    text = "[Q] what? [A] [EOS][BOS][PAD][MASK][T] <|endoftext|>"
    ids = tok.encode(text)
    assert all(i < len(tok.ranks) for i in ids)
    assert tok.decode(ids) == text
    ids, _ = render_interaction(tok, "[Q] hi", "[EOS] bye", 64)
    assert ids.count(tok.q_id) == 1 and ids.count(tok.a_id) == 1 and ids.count(tok.eos_id) == 1
    assert ids[:2] == [tok.bos_id, tok.q_id] and ids[-1] == tok.eos_id


def test_query_and_interaction_templates(tok):
    q, a = tok.encode("Where is Mia?"), tok.encode("park")
    assert render_query(tok, "Where is Mia?", 64) == [tok.bos_id, tok.q_id] + q + [tok.a_id]
    ids, start = render_interaction(tok, "Where is Mia?", "park", 64)
    assert ids == [tok.bos_id, tok.q_id] + q + [tok.a_id] + a + [tok.eos_id] and ids[start:] == a + [tok.eos_id]


def test_save_load_round_trip_gives_identical_encodings(tok, tmp_path):
    path = str(tmp_path / "tok.tiktoken")
    save_ranks(path, tok.ranks)
    assert not (tmp_path / "tok.tiktoken.tmp").exists()
    tok2 = Tokenizer.from_file(path)
    assert tok2.ranks == tok.ranks
    for text in VARIED:
        assert tok2.encode(text) == tok.encode(text)


def test_missing_or_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_ranks(str(tmp_path / "nope.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64!! x\n")
    with pytest.raises(ValueError, match="bad.tiktoken"):
        load_ranks(str(bad))


def test_decode_bytes_streams_multibyte_characters(tok):
    import codecs
    text = "hi 😀 ❤️ café"
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = "".join(dec.decode(tok.decode_bytes([i])) for i in tok.encode(text))
    assert out == text
    assert tok.decode_bytes([tok.eos_id]) == b"[EOS]"
    assert tok.decode([10 ** 6]) == "[UNK]"  # ids beyond the vocab (a padded embedding) do not crash decoding


def test_the_first_id_past_the_vocab_decodes_as_unk():
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    assert tok.decode([tok.vocab_size]) == "[UNK]"


def test_read_texts_ends_every_chunk_at_a_line_end(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello brave new world\n" * 100)
    chunks = list(read_texts([str(path)], max_bytes=50))
    assert chunks and all(c.endswith("\n") for c in chunks)


def test_the_tokenizer_cli_refuses_a_vocab_without_room_for_the_specials(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello world " * 100)
    with pytest.raises(cli.ConfigError):
        tokenizer_module.main(["--input", str(text), "--vocab_size", "260", "--out", str(tmp_path / "t.tiktoken")])


def test_a_tiktoken_file_without_all_256_bytes_is_refused(tmp_path):
    path = str(tmp_path / "t.tiktoken")
    save_ranks(path, {bytes([i]): i for i in range(200)})  # ranks 0..199: consecutive, but bytes are missing
    with pytest.raises(ValueError):
        load_ranks(path)
    save_ranks(path, {bytes([i]): i for i in range(256)})
    assert len(load_ranks(path)) == 256
