"""
Byte-level BPE tokenizer: our own (fast) trainer for the merges, tiktoken for encoding at run time.

    python -m data.tokenizer --input a.txt b.txt --vocab_size 7500 --out data/cache/tok7500.tiktoken

The merges are stored as a `.tiktoken` file (one `base64(token_bytes) rank` per line). Ranks 0..255 are the single
bytes; the special tokens come right after the ranks, in the order of SPECIAL_TOKENS.

`Tokenizer.from_hf_json` reads the other kind nanoRxT meets: the Hugging Face `tokenizer.json` of a published RxT-Alpha
model (byte-level BPE, its specials at their own ids), encoded by tiktoken with the same ids.
"""

import base64
import heapq
import json
import os
import re
import time
from collections import Counter, defaultdict

import tiktoken

import cli

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[Q]", "[A]", "[T]"]

# The pre-tokenizer splits text into pieces (words, numbers, punctuation runs, whitespace) that BPE never merges
# across. GPT-2's pattern needs \p{L}, which Python's stdlib `re` lacks, so we say "letter" with classes both engines
# know: [^\W\d] (word characters that are not digits). The trainer splits with `re`, tiktoken with Rust fancy-regex;
# their \w differ on a few characters, which we pin down by hand: combining accents, zero-width (non-)joiners and
# emoji variation selectors are letters in both (Rust counts them as \w, Python does not), so "❤️" and "👨‍👩‍👧"
# split the same way in both. Known remaining differences (tests/test_data_tokenizer.py): marks of other scripts
# (Devanagari vowel signs, ...) and superscript digits and fractions (² ½).
# They only change what the trainer counts; encoding is always done by tiktoken and is lossless.
_MARKS = "\u0300-\u036f\u200c\u200d\u20d0-\u20ff\ufe00-\ufe0f"
PAT_STR = (
    r"'(?:[sdmt]|ll|ve|re)"               # contractions: 's 't 're 've 'm 'll 'd
    rf"| ?(?:[^\W\d]|[{_MARKS}])+"        # letters (and _), with an optional leading space
    r"| ?\d{1,3}"                         # numbers, at most 3 digits per piece
    rf"| ?[^\s\w{_MARKS}]+"               # punctuation, symbols, emoji
    r"|\s+(?!\S)"                         # whitespace, leaving the last space to the next word
    r"|\s+"
)
# GPT-2's own pattern, which Hugging Face's ByteLevel pre-tokenizer uses (tokenizers converted by from_hf_json)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_stats_word(ids):
    """Pair counts inside one word (overlapping pairs counted, as in every BPE)."""
    return Counter(zip(ids, ids[1:]))


def merge_word(ids, pair, new_id):
    """Replace every non-overlapping occurrence of pair in ids (left to right) by new_id."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def count_pretokens(texts, verbose=True):
    """Counter of the pre-tokenizer pieces of all texts."""
    pat = re.compile(PAT_STR)
    counts = Counter()
    for text in cli.progress(texts, desc="pre-tokenizing", unit=" texts", disable=not verbose):
        counts.update(pat.findall(text))
    return counts


def train_bpe(texts, vocab_size, verbose=True):
    """
    Learn byte-level BPE ranks from an iterable of strings. vocab_size counts the 256 bytes, the merges and the
    len(SPECIAL_TOKENS) specials, so we learn vocab_size - 256 - 8 merges (fewer if the text runs out of pairs).
    Returns {token_bytes: rank}, ranks 0..255 being the single bytes. Ties go to the smallest (left id, right id).
    """
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    assert n_merges >= 0, f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}"
    ranks = {bytes([i]): i for i in range(256)}
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes

    # each unique piece becomes one word: a list of token ids and how often it occurs
    counts = count_pretokens(texts, verbose)
    words = [list(piece.encode("utf-8")) for piece in counts]
    freqs = list(counts.values())

    # global pair counts, and for each pair the set of words that contain it
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for w, ids in enumerate(words):
        for pair, c in get_stats_word(ids).items():
            pair_counts[pair] += c * freqs[w]
            where[pair].add(w)
    # max-heap of (-count, pair); entries go stale when a count changes, we check them when popped
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    pbar = cli.progress(total=n_merges, desc="bpe merges", disable=not verbose)
    while len(vocab) < 256 + n_merges:
        if not heap:
            if verbose:
                print(f"\ntrain_bpe: every piece of the text is one token after {len(vocab) - 256} merges, "
                      f"so the vocab is {len(vocab) + len(SPECIAL_TOKENS)} instead of {vocab_size}")
            break
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale entry
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged in ranks:
            # the same bytes were already made from another split ("a"+"bc" vs "ab"+"c"): reuse that token, so the
            # ranks stay one token per byte string (tiktoken needs that); it takes no new rank
            new_id = ranks[merged]
        else:
            new_id = len(vocab)
            ranks[merged] = new_id
            vocab.append(merged)
            pbar.update(1)
        # update only the words that contain the pair
        changed = set()
        for w in where.pop(pair):
            old = words[w]
            new = merge_word(old, pair, new_id)
            words[w] = new
            old_stats, new_stats = get_stats_word(old), get_stats_word(new)
            for p in old_stats.keys() | new_stats.keys():
                delta = (new_stats.get(p, 0) - old_stats.get(p, 0)) * freqs[w]
                if delta:
                    pair_counts[p] += delta
                    changed.add(p)
                if p != pair:
                    if p in new_stats:
                        where[p].add(w)
                    elif p in where:
                        where[p].discard(w)
        for p in changed:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]
                where.pop(p, None)
        pair_counts.pop(pair, None)
    pbar.close()
    return ranks


def save_ranks(path, ranks):
    """Write ranks in the .tiktoken format (base64 token, space, rank; sorted by rank), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    os.replace(tmp, path)


def load_ranks(path):
    """Read a .tiktoken file back into {token_bytes: rank}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} not found (train one with `python -m data.tokenizer`)")
    ranks = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a .tiktoken line ({line.strip()[:60]!r}): {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise ValueError(f"{path}: ranks must be 0..N-1 (N >= 256) with no duplicates")
    return ranks


class Tokenizer:
    """The BPE ranks plus the special tokens, encoded and decoded by tiktoken. Our own tokenizers put the specials
    right after the ranks (specials=None); a converted one (from_hf_json) brings its own ids for both, its pattern,
    and its vocab_size: ranks at or above it are bytes its vocabulary lacks, which encode as [UNK]."""

    def __init__(self, ranks, specials=None, pat_str=PAT_STR, vocab_size=None):
        self.ranks, self.converted = ranks, specials is not None
        if specials is None:
            specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.specials, self.pat_str = specials, pat_str
        self.enc = tiktoken.Encoding(name="nanorxt", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = len(ranks) + len(specials) if vocab_size is None else vocab_size
        (self.pad_id, self.unk_id, self.bos_id, self.eos_id,
         self.mask_id, self.q_id, self.a_id, self.t_id) = (specials.get(tok) for tok in SPECIAL_TOKENS)
        self.lacks_bytes = max(ranks.values()) >= self.vocab_size  # converted vocabularies may

    @classmethod
    def from_file(cls, path):
        return cls(load_ranks(path))

    @classmethod
    def from_hf_json(cls, path):
        """A Hugging Face tokenizer.json of byte-level BPE (as RxNN/RxLM train them) with the same ids: each vocab
        entry, un-mapped from the byte-level alphabet to its bytes, keeps its id as its tiktoken rank, the added
        tokens are the specials at their ids, and the pattern is GPT-2's. tiktoken merges by the rank of the merged
        bytes where Hugging Face follows its list of merges; for a vocabulary trained by BPE, where every token's id
        is its merge's place in that list, they agree (tests/test_convert_rxnn.py compares them). Bytes the
        vocabulary lacks (the trainer keeps only the characters it saw) get ranks after the vocabulary and encode
        as [UNK], one per byte, as Hugging Face's do. No space is added in front of the text: RxNN and RxLM encode
        through transformers' PreTrainedTokenizerFast, which turns the ByteLevel add_prefix_space off.
        Differences: text that spells a special ("[Q]") stays text here, and the merges list itself is not read.
        Raises ValueError naming what is not supported."""
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        model, pre = j.get("model") or {}, j.get("pre_tokenizer") or {}
        for ok, what in [(model.get("type") == "BPE", f"model type {model.get('type')!r} (only BPE)"),
                         (pre.get("type") == "ByteLevel" and pre.get("use_regex", True),
                          f"pre-tokenizer {pre.get('type')!r} (only ByteLevel with GPT-2's pattern)"),
                         (j.get("normalizer") is None, "a normalizer"),
                         (not model.get("byte_fallback") and not model.get("continuing_subword_prefix")
                          and not model.get("end_of_word_suffix") and not model.get("dropout"),
                          "byte_fallback / subword prefix / suffix / dropout")]:
            if not ok:
                raise ValueError(f"{path}: {what} is not supported: nanoRxT reads byte-level BPE")
        specials = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
        missing = [t for t in SPECIAL_TOKENS[:7] if t not in specials]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} among its added tokens")
        char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        ranks = {}
        for token, i in model.get("vocab", {}).items():
            if token in specials:
                continue
            if any(c not in char_to_byte for c in token):
                raise ValueError(f"{path}: vocab entry {token!r} is not in the byte-level alphabet")
            ranks[bytes(char_to_byte[c] for c in token)] = i
        ids = sorted([*ranks.values(), *specials.values()])
        if ids != list(range(len(ids))):
            raise ValueError(f"{path}: its ids are not 0..N-1, one token each")
        vocab_size = len(ids)
        for b in range(256):  # bytes the vocabulary lacks: ranks after it, read as [UNK]
            ranks.setdefault(bytes([b]), vocab_size + b)
        return cls(ranks, specials, GPT2_PAT_STR, vocab_size)

    def state(self):
        """What a checkpoint keeps to rebuild this tokenizer (training.save_checkpoint): Tokenizer(**state)."""
        if not self.converted:
            return {"ranks": self.ranks}
        return {"ranks": self.ranks, "specials": self.specials, "pat_str": self.pat_str, "vocab_size": self.vocab_size}

    def encode(self, text):
        """Ordinary text -> ids. Never produces a special token: "[Q]" typed by a user is just text."""
        ids = self.enc.encode_ordinary(text)
        return [i if i < self.vocab_size else self.unk_id for i in ids] if self.lacks_bytes else ids

    def encode_batch(self, texts):
        if self.lacks_bytes:
            return [self.encode(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts)

    def _valid(self, ids):
        # ids the model may sample beyond the vocab (a padded embedding) read as [UNK] instead of crashing
        return [i if 0 <= i < self.vocab_size else self.unk_id for i in ids]

    def decode(self, ids):
        """ids -> str; specials are rendered as their names ("[EOS]"), invalid utf-8 as U+FFFD."""
        return self.enc.decode(self._valid(ids), errors="replace")

    def decode_bytes(self, ids):
        """ids -> raw bytes (specials rendered as their names). For streaming: accumulate the bytes and print only
        complete characters, e.g. with codecs.getincrementaldecoder("utf-8")(errors="replace")."""
        return self.enc.decode_bytes(self._valid(ids))


def bytes_to_unicode():
    """GPT-2's byte-level alphabet, which Hugging Face's ByteLevel uses too: {byte: the printable character that
    stands for it in vocab strings}. Printable bytes stand for themselves; the others (space, control bytes, ...)
    take the characters from 256 on, in byte order (so " " is "\u0120", printed as "Ġ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def read_texts(paths, max_bytes=None):
    """Yield the text of the files in chunks of about 1 MB, stopping after max_bytes characters in all."""
    seen = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            while max_bytes is None or seen < max_bytes:
                chunk = f.read(1 << 20 if max_bytes is None else min(1 << 20, max_bytes - seen))
                if not chunk:
                    break
                # finish the line so we do not cut a word in two
                chunk += f.readline()
                seen += len(chunk)
                yield chunk


def main(argv):
    parser = cli.ArgumentParser(description="Train a byte-level BPE tokenizer into a .tiktoken file.")
    parser.add_argument("--input", nargs="+", required=True, help="text files to train on")
    parser.add_argument("--vocab_size", type=int, default=7500, help="total, including the 8 special tokens")
    parser.add_argument("--out", required=True, help="output .tiktoken file")
    parser.add_argument("--max_bytes", type=int, default=None, help="train on at most this many characters")
    args = parser.parse_args(argv)
    cli.check(vars(args), vocab_size=cli.at_least(256 + len(SPECIAL_TOKENS)),
              max_bytes=((lambda v: v is None or v >= 1), "a positive number of characters"))
    for path in args.input:
        if not os.path.isfile(path):
            raise cli.UserError(f"input {path} not found")
    texts = list(read_texts(args.input, args.max_bytes))
    n_chars = sum(len(t) for t in texts)
    if not n_chars:
        raise cli.UserError(f"{', '.join(args.input)}: no text to learn from")
    t0 = time.time()
    ranks = train_bpe(texts, args.vocab_size)
    dt = time.time() - t0
    save_ranks(args.out, ranks)
    tok = Tokenizer(ranks)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    print(f"trained on {n_chars / 1e6:.1f}M characters in {dt:.1f}s; vocab {tok.vocab_size} -> {args.out}")
    print(f"{n_bytes / n_tokens:.2f} bytes/token on the input ({n_tokens:,} tokens)")


if __name__ == "__main__":
    cli.run(main)
