import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from data.loaders import get_lm_batch
from data.tinystories import SEPARATOR, download, iter_stories, prepare, tokenize_to_bin
from data.tokenizer import Tokenizer, train_bpe

PAYLOAD = bytes(range(256)) * 4000 + b"the end"  # ~1 MB, every byte value


class Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file (honouring Range with 206), 404 elsewhere; records the Range headers it saw."""
    ranges = []
    honour_range = True
    cut = 0  # bytes left out of the body while Content-Length still promises them (a connection that drops)

    def do_GET(self):
        if self.path != "/file":
            self.send_error(404, "no such file")
            return
        rng = self.headers.get("Range")
        Handler.ranges.append(rng)
        body, status = PAYLOAD, 200
        if rng and Handler.honour_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            body, status = PAYLOAD[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {len(PAYLOAD) - len(body)}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        self.wfile.write(body[:len(body) - Handler.cut])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.ranges, Handler.honour_range, Handler.cut = [], True, 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_download_cut_short_keeps_its_part_and_is_never_taken_for_the_file(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    Handler.cut = 1000
    with pytest.raises(RuntimeError, match="run again to resume"):
        download(server + "/file", dest, chunk=4096)
    assert not os.path.exists(dest) and os.path.getsize(dest + ".part") == len(PAYLOAD) - 1000
    Handler.cut = 0
    download(server + "/file", dest, chunk=4096)  # the next try resumes from the part
    assert open(dest, "rb").read() == PAYLOAD


def test_download_writes_the_exact_bytes(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    download(server + "/file", dest, chunk=4096)
    assert open(dest, "rb").read() == PAYLOAD
    assert not os.path.exists(dest + ".part") and Handler.ranges == [None]
    download(server + "/file", dest)  # present: skipped, no request
    assert Handler.ranges == [None]


def test_download_resumes_a_truncated_part_with_a_range_request(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    with open(dest + ".part", "wb") as f:
        f.write(PAYLOAD[:12345])
    download(server + "/file", dest)
    assert Handler.ranges == ["bytes=12345-"]
    assert open(dest, "rb").read() == PAYLOAD


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    Handler.honour_range = False
    dest = str(tmp_path / "f.txt")
    with open(dest + ".part", "wb") as f:
        f.write(b"garbage that is not a prefix")
    download(server + "/file", dest)
    assert Handler.ranges == ["bytes=28-"]
    assert open(dest, "rb").read() == PAYLOAD


def test_download_of_a_missing_file_is_a_clear_error(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    with pytest.raises(RuntimeError, match=r"/nope.*404"):
        download(server + "/nope", dest)
    assert not os.path.exists(dest)


def test_download_from_an_unreachable_host_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = str(tmp_path / "f.txt")
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
        download(f"http://127.0.0.1:{port}/file", dest, timeout=5)
    assert not os.path.exists(dest)


STORIES = [f"Story {i}: Once upon a time, Mia had {i} red balls.\nShe was happy. 😀" for i in range(50)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(train_bpe(STORIES, 320, verbose=False))


def write_stories(path, stories):
    # the real files put the separator on its own line; add empty and blank entries that must be skipped
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"\n{SEPARATOR}\n".join(stories) + f"\n{SEPARATOR}\n  \n{SEPARATOR}{SEPARATOR}\n")


def test_iter_stories_splits_on_endoftext_across_chunks(tmp_path):
    path = str(tmp_path / "s.txt")
    write_stories(path, STORIES)
    assert list(iter_stories(path, chunk=7)) == STORIES  # tiny chunks cut separators and emoji in two
    assert list(iter_stories(path)) == STORIES
    with open(path, "w", encoding="utf-8") as f:  # a file that does not end with a separator keeps its last story
        f.write(f"\n{SEPARATOR}\n".join(STORIES))
    assert list(iter_stories(path, chunk=7)) == STORIES


def test_bin_holds_bos_story_eos_per_story(tmp_path, tok):
    out = str(tmp_path / "train.bin")
    tokenize_to_bin(STORIES, tok, out, batch=8)
    ids = np.fromfile(out, dtype=np.uint16).tolist()
    expected = [i for s in STORIES for i in [tok.bos_id] + tok.encode(s) + [tok.eos_id]]
    assert ids == expected
    assert tok.decode(ids).split("[EOS]")[:2] == ["[BOS]" + STORIES[0], "[BOS]" + STORIES[1]]


def test_tokenize_skips_when_the_bin_exists_and_honours_max_stories(tmp_path, tok):
    out = str(tmp_path / "val.bin")
    tokenize_to_bin(STORIES, tok, out, max_stories=3)
    ids = np.fromfile(out, dtype=np.uint16)
    assert (ids == tok.bos_id).sum() == 3 and (ids == tok.eos_id).sum() == 3
    tokenize_to_bin(STORIES, tok, out)  # present: kept as is
    assert np.array_equal(np.fromfile(out, dtype=np.uint16), ids)
    assert not os.path.exists(out + ".tmp")


def test_prepare_from_local_files_then_load_batches(tmp_path):
    train, valid = str(tmp_path / "train.txt"), str(tmp_path / "valid.txt")
    write_stories(train, STORIES)
    write_stories(valid, STORIES[:10])
    out = str(tmp_path / "ts")
    prepare(out, vocab_size=300, train_path=train, valid_path=valid)
    assert sorted(os.listdir(out)) == ["tokenizer.tiktoken", "train.bin", "val.bin"]
    x = get_lm_batch(os.path.join(out, "val.bin"), batch_size=4, seq_len=16)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    ids = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16).tolist()
    assert all(any(ids[i:i + 16] == row for i in range(len(ids) - 15)) for row in x.tolist())  # real windows


def test_prepare_tokenizes_val_bin_from_the_valid_file(tmp_path):
    stories = [f"Story number {i}: a cat sat on a mat and then a dog came by." for i in range(40)]
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(f"\n{SEPARATOR}\n".join(stories))
    valid.write_text(f"\n{SEPARATOR}\n".join(stories[:5]))
    out = str(tmp_path / "ts")
    prepare(out, vocab_size=300, train_path=str(train), valid_path=str(valid))
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.tiktoken"))
    want = sum(len(ids) + 2 for ids in tok.encode_batch(stories[:5]))
    assert os.path.getsize(os.path.join(out, "val.bin")) // 2 == want


def test_a_tokenizing_run_cut_short_leaves_no_bin_to_be_taken_for_a_whole_one(tmp_path, tok):
    out = str(tmp_path / "train.bin")

    def stories():
        yield from ["Once upon a time there was a cat."] * 3
        raise KeyboardInterrupt  # Ctrl-C in the middle
    with pytest.raises(KeyboardInterrupt):
        tokenize_to_bin(stories(), tok, out, batch=2)
    assert not os.path.exists(out)  # the next run tokenizes again instead of skipping a half file
    tokenize_to_bin(["Once upon a time there was a cat."] * 3, tok, out)
    assert np.fromfile(out, dtype=np.uint16).tolist().count(tok.bos_id) == 3
