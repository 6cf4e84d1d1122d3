"""
TinyStories (real data): download, train the tokenizer on a sample, tokenize to uint16 .bin files (nanoGPT style).

    python -m data.tinystories --out_dir data/cache/tinystories --vocab_size 7500
    python -m data.tinystories --out_dir data/cache/ts --train_path my/train.txt --valid_path my/valid.txt

Every step skips when its output exists, so an interrupted run can simply be started again. Each story is written
as [BOS] story [EOS]; the training scripts read random windows with np.memmap (data/loaders.py).
"""

import http.client
import itertools
import os
import time
import urllib.error
import urllib.request

import numpy as np

import cli
from data.tokenizer import Tokenizer, save_ranks, train_bpe

URL_BASE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
TRAIN_FILE = "TinyStoriesV2-GPT4-train.txt"
VALID_FILE = "TinyStoriesV2-GPT4-valid.txt"
SEPARATOR = "<|endoftext|>"


def download(url, dest, chunk=1 << 20, timeout=30):
    """
    Download url to dest with a progress bar. Bytes go to dest + '.part' first, renamed to dest when complete, so
    dest is never half written. An existing .part is resumed with an HTTP Range request. Skips if dest exists.
    """
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our .part is not a prefix the server can continue: start over
            os.remove(part)
            return download(url, dest, chunk, timeout)
        raise RuntimeError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"download of {url} failed: {getattr(e, 'reason', e)}") from None

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)  # only now: a failed request writes nothing
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range header and sends the whole file: restart from zero
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        name = os.path.basename(dest)
        with open(part, "ab" if have else "wb") as f, \
                cli.progress(total=total, initial=have, desc=f"downloading {name}", unit="B", unit_scale=True) as bar:
            try:
                while True:
                    data = response.read(chunk)
                    if not data:
                        break
                    f.write(data)
                    bar.update(len(data))
            except (OSError, http.client.HTTPException) as e:  # connection dropped: keep the .part for the next try
                raise RuntimeError(f"download of {url} interrupted ({e}); run again to resume") from None
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise RuntimeError(f"download of {url} incomplete ({size} of {total} bytes); run again to resume")
    os.replace(part, dest)
    return dest


def iter_stories(path, chunk=1 << 20):
    """Yield the stories of a file separated by <|endoftext|>, stripped, skipping empty ones. Streams the file."""
    buf = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            buf += data
            *stories, buf = buf.split(SEPARATOR)  # the last piece may continue in the next chunk
            for story in stories:
                story = story.strip()
                if story:
                    yield story
    buf = buf.strip()
    if buf:
        yield buf


def tokenize_to_bin(stories, tokenizer, out_path, max_stories=None, batch=1024):
    """Write [BOS] story [EOS] for every story as uint16 to out_path (atomic; skips if out_path exists)."""
    if os.path.exists(out_path):
        print(f"{out_path} exists, skipping")
        return out_path
    assert tokenizer.vocab_size < 2 ** 16, "uint16 .bin files need a vocab below 65536"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    stories = iter(stories) if max_stories is None else itertools.islice(stories, max_stories)
    tmp = out_path + ".tmp"
    n_tokens = 0
    with open(tmp, "wb") as f, cli.progress(desc=f"tokenizing {os.path.basename(out_path)}", unit=" stories") as bar:
        while True:
            texts = list(itertools.islice(stories, batch))
            if not texts:
                break
            ids = []
            for story in tokenizer.encode_batch(texts):
                ids += [tokenizer.bos_id] + story + [tokenizer.eos_id]
            np.array(ids, dtype=np.uint16).tofile(f)
            n_tokens += len(ids)
            bar.update(len(texts))
    os.replace(tmp, out_path)
    print(f"wrote {n_tokens:,} tokens to {out_path}")
    return out_path


def sample_text(stories, n_bytes):
    """The first stories, about n_bytes of text in all (the tokenizer's training sample)."""
    out, size = [], 0
    for story in stories:
        out.append(story)
        size += len(story.encode("utf-8"))
        if size >= n_bytes:
            break
    return out


def prepare(out_dir, vocab_size=7500, train_path=None, valid_path=None, max_stories=None,
            tokenizer_sample_bytes=20_000_000):
    """Download (or take local files), train the tokenizer on a sample, write train.bin and val.bin."""
    train_path = train_path or download(URL_BASE + TRAIN_FILE, os.path.join(out_dir, TRAIN_FILE))
    valid_path = valid_path or download(URL_BASE + VALID_FILE, os.path.join(out_dir, VALID_FILE))
    os.makedirs(out_dir, exist_ok=True)

    tok_path = os.path.join(out_dir, "tokenizer.tiktoken")
    if os.path.exists(tok_path):
        print(f"{tok_path} exists, skipping tokenizer training")
    else:
        t0 = time.time()
        sample = sample_text(iter_stories(train_path), tokenizer_sample_bytes)
        ranks = train_bpe(sample, vocab_size)
        save_ranks(tok_path, ranks)
        print(f"trained the tokenizer (vocab {len(ranks) + 8}) on {len(sample):,} stories in {time.time() - t0:.1f}s")
    tok = Tokenizer.from_file(tok_path)

    tokenize_to_bin(iter_stories(train_path), tok, os.path.join(out_dir, "train.bin"), max_stories)
    tokenize_to_bin(iter_stories(valid_path), tok, os.path.join(out_dir, "val.bin"), max_stories)
    return out_dir


def main(argv):
    parser = cli.ArgumentParser(description="Prepare TinyStories: tokenizer.tiktoken, train.bin, val.bin.")
    parser.add_argument("--out_dir", default="data/cache/tinystories")
    parser.add_argument("--vocab_size", type=int, default=7500)
    parser.add_argument("--train_path", default=None, help="local train .txt instead of downloading")
    parser.add_argument("--valid_path", default=None, help="local valid .txt instead of downloading")
    parser.add_argument("--max_stories", type=int, default=None, help="tokenize at most this many stories per split")
    parser.add_argument("--tokenizer_sample_bytes", type=int, default=20_000_000)
    args = parser.parse_args(argv)
    cli.check(vars(args), vocab_size=cli.at_least(264), tokenizer_sample_bytes=cli.at_least(1000),
              max_stories=((lambda v: v is None or v >= 1), "a positive number of stories"))
    for path in (args.train_path, args.valid_path):
        if path is not None and not os.path.isfile(path):
            raise cli.UserError(f"{path} not found (give a TinyStories .txt file, or leave it out to download)")
    try:
        prepare(args.out_dir, args.vocab_size, args.train_path, args.valid_path, args.max_stories,
                args.tokenizer_sample_bytes)
    except RuntimeError as e:  # download failures: the message says what happened
        raise cli.UserError(f"{e} (offline? give local files with --train_path and --valid_path)")


if __name__ == "__main__":
    cli.run(main)
