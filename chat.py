"""
Chat with a Reactive Transformer. The answer streams token by token while the decoder reads the Short-Term Memory;
after each answer the memory update (encoder + memory attention) runs in a background thread, off your path - the
next turn waits only if it has not finished. The conversation is never re-read: everything the model knows about
earlier turns is in the STM.

    python chat.py [--ckpt=out/nano/mrl/ckpt.pt] [--temperature=0.7 --top_k=50 --top_p=0.9 --max_new_tokens=64]
    echo "Mia has a red ball." | python chat.py        # one query per line from a pipe

Commands: /reset (new memory), /memory (per-layer STM norms and how much the last update changed them), /help, /quit
"""

import codecs
import os
import sys
import threading

import torch

import cli
import engine
import training
from data.loaders import collate_queries
from model import ReactiveTransformer

DEFAULTS = dict(
    ckpt="out/nano/mrl/ckpt.pt",
    temperature=0.0,  # greedy by default: the demo is about recall, raise it for variety
    top_k=0,
    top_p=1.0,
    max_new_tokens=64,
    seed=1337,
    device="cpu",
)

HELP = "commands: /reset new memory, /memory STM per-layer norms and last change, /help, /quit (or Ctrl-D)"


class Session:
    """One conversation: the STM and the background thread that writes each finished turn into it."""

    def __init__(self, model, tok, cfg):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.generator = torch.Generator(model.embed.weight.device).manual_seed(cfg["seed"])
        self.reset()

    def reset(self):
        self.wait()
        self.stm = self.model.new_memory(1, generator=self.generator)
        self.previous, self.thread = None, None

    def wait(self):
        """The next turn reads STM_t, so it waits for the update of the last turn (usually long finished)."""
        if getattr(self, "thread", None) is not None:
            self.thread.join()
            self.thread = None

    def answer(self, query, out):
        """Stream the answer to `out`; then start the memory update in the background. Returns the answer text."""
        self.wait()
        seq_len, max_new = self.model.cfg.seq_len, self.cfg["max_new_tokens"]
        query_ids = collate_queries(self.tok, [query], seq_len, max_new)[0][0].tolist()  # [BOS][Q] query [A]
        n = len(self.tok.encode(query))
        if n + 3 > len(query_ids):  # the data's rule: drop from the front, the question usually ends the message
            print(f"(input is {n} tokens; truncated to its last {len(query_ids) - 3})", file=sys.stderr)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # print whole characters only (emoji!)
        answer = []
        for tok_id in engine.interact(self.model, query_ids, self.stm, temperature=self.cfg["temperature"],
                                      top_k=self.cfg["top_k"] or None, top_p=self.cfg["top_p"],
                                      max_new_tokens=self.cfg["max_new_tokens"], eos_id=self.tok.eos_id,
                                      generator=self.generator):
            answer.append(tok_id)
            out.write(utf8.decode(self.tok.decode_bytes([tok_id])))
            out.flush()
        out.write(utf8.decode(b"", final=True))
        interaction = torch.tensor([query_ids + answer + [self.tok.eos_id]], device=self.stm.device)
        self.thread = threading.Thread(target=self._update, args=(interaction,), daemon=True)
        self.thread.start()
        return self.tok.decode(answer)

    @torch.no_grad()
    def _update(self, interaction):
        self.previous = self.stm
        self.stm = self.model.update_memory(self.stm, interaction)

    def memory_report(self):
        self.wait()
        norms = self.stm[:, 0].norm(dim=-1).mean(dim=-1)  # (L,) mean slot norm per layer
        lines = []
        for l, n in enumerate(norms.tolist()):
            line = f"  layer {l}: mean slot norm {n:.3f}"
            if self.previous is not None:
                change = (self.stm[l, 0] - self.previous[l, 0]).norm() / self.previous[l, 0].norm().clamp(min=1e-9)
                line += f", last update changed it by {change.item():.1%}"
            lines.append(line)
        return "\n".join(lines)


def load(cfg):
    if not os.path.isfile(cfg["ckpt"]):
        raise cli.CheckpointError(f"checkpoint not found: {cfg['ckpt']} (train one with: python demo.py)")
    model, tok, ckpt = training.load_for_inference(cfg["ckpt"], training.resolve_device(cfg["device"]))
    if not isinstance(model, ReactiveTransformer):
        raise cli.CheckpointError(f"{cfg['ckpt']} holds the stateless baseline; chat.py talks to an RxT model")
    return model, tok, ckpt


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    cli.check(cfg, temperature=cli.at_least(0), top_k=cli.at_least(0), seed=cli.at_least(0),
              top_p=cli.between(0.01, 1), max_new_tokens=cli.at_least(1))
    cli.check_device(cfg["device"])
    model, tok, ckpt = load(cfg)
    if not 0 < cfg["max_new_tokens"] <= model.cfg.seq_len // 2:
        raise cli.ConfigError(f"max_new_tokens must be in 1..{model.cfg.seq_len // 2} (the model's interactions "
                              f"are at most {model.cfg.seq_len} tokens, and the query needs room too)")
    session = Session(model, tok, cfg)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"nanoRxT chat - {cfg['ckpt']} (stage {ckpt['stage']}). {HELP}")
    try:
        converse(session, interactive)
    except KeyboardInterrupt:  # Ctrl-C ends the chat cleanly
        print()
    session.wait()


def converse(session, interactive):
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        query = line.strip()
        if not query:
            continue  # empty input is ignored
        if query in ("/quit", "/exit"):
            break
        if query == "/help":
            print(HELP)
        elif query == "/reset":
            session.reset()
            print("(memory reset)")
        elif query == "/memory":
            print(session.memory_report())
        elif query.startswith("/"):
            print(f"unknown command {query}; {HELP}")
        else:
            if not interactive:
                print(f"you> {query}")
            sys.stdout.write("rxt> ")
            session.answer(query, sys.stdout)
            sys.stdout.write("\n")
            sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
