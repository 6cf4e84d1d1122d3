"""
Builds tests/rxnn_fixture/, the reference that tests/test_convert_rxnn.py checks convert_rxnn.py against: tiny
random-weight RxT-Alpha components made by the reference implementation, RxNN 0.2.171 (Apache-2.0; the RxAI-dev/RxNN
repository on GitHub at its last release, the code that trained the RxT-Alpha Micro cards), saved with
`save_pretrained` exactly as the published components were, and the outputs RxNN computes from them on fixed inputs.

Not run by CI, and not needed to run the tests (the fixture is committed). RxNN is not on PyPI; to rebuild:

    git clone https://github.com/RxAI-dev/RxNN /tmp/RxNN                       # release 0.2.171
    python -m venv --system-site-packages /tmp/rxnn_venv                     # sees the installed torch
    /tmp/rxnn_venv/bin/pip install "transformers>=4.51,<5" tokenizers huggingface_hub safetensors
    PYTHONPATH=/tmp/RxNN/python/src /tmp/rxnn_venv/bin/python tests/make_rxnn_fixture.py

What it writes (fp32 on CPU, one thread; every weight random: matrices, norms (1 +- 0.2), biases, gates, router).
Sizes: D 16, 2 layers, 2 heads of size 8, 8 STM slots, 4 experts of 8 (top 2), vocab 112; about 250 kB in all.
  rxnn/            the Micro-SMAT kinds as RxNN 0.2.171 saves them: encoder (dense SwiGLU with biases), decoder (MoE,
                   legacy per-expert GatedFeedForward with biases, no final norm) + tokenizer.json, interlayer memory
                   attention with linear per-slot sigmoid gates, MLM head. 2 query heads share 1 key/value head.
  rxlm3/           the same kinds in the layout of rxlm >= 0.3.40, weights bf16. *Synthesized*, not recorded from rxlm:
                   a second RxNN model (1 query and 1 key/value head of 2: sSQA; a LayerNorm before the LM head,
                   use_head_norm; zero fc1 biases and one shared fc2 bias in every expert) is recorded, then its files
                   are rewritten as rxlm >= 0.3.40 writes them: experts stacked into ff.w1 (E, D, 2H) / ff.w2 (E, H,
                   D) with that shared bias as ff.global_bias, no model.stm.memory in the encoder, rope_base in the
                   memory attention's config, and the rows of the one side that RoPE leaves alone where it touches
                   one side only (the decoder's memory cross-attention keys, the memory attention's queries)
                   re-interleaved head by head. rxlm >= 0.3.40 writes RoPE's output interleaved (torch.stack) where RxNN writes it
                   half-split (torch.cat); with that re-interleaving the newer library computes, from these files,
                   exactly what RxNN computes from the originals (score = rot(q) . k either way). Weights are rounded
                   to bf16 before recording, so the bf16 files hold exactly the weights the reference used (the RoPE
                   buffers stay fp32). Checked once by hand: rxlm 0.3.80 itself, run on these files, gives the recorded
                   ED, STM and logits to 2e-6.
  memattn_simple/  memory attention only: the simple variant, one static gate per layer (shape (1,)).
  memattn_self/    memory attention only: the self variant, elementwise per-slot gates, the self step gated too.
  reference.pt     the inputs (ids (2, 12) with the second row right-padded by 4, its mask, an STM (2, 2, 8, 16) of
                   N(0, 1)) and per set: the encoder's ED (L, B, T, D), the updated STM, the decoder's logits
                   teacher-forced on the padded batch (RxNN masks the padded rows out of the memory read; only the real
                   positions are compared), the MLM head's logits; the memory-attention-only sets' updated STM from
                   rxnn's ED; and tokenizer encodings from `transformers.PreTrainedTokenizerFast` (what RxNN used).
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from rxnn.rxt.models import (RxTDecoder, RxTEncoder, RxTInterlayerMemoryAttention, RxTSelfMemoryAttention,
                             RxTSimpleMemoryAttention)
from rxnn.training.models import MLMHead

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rxnn_fixture")
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[Q]", "[A]"]
L, D, H, S, T, B = 2, 16, 2, 8, 12, 2  # head size 8
TEXTS = ["Mia has a red ball.", "What colour is Mia's ball?", "Tom's cat is 3 years old; it's grey!",
         "hello  world\n\nok", "Rosa has an orange kite, and Leo likes pizza (a lot).", "  spaces   everywhere  ",
         "numbers 12345 and 2025-12-01", "caf\u00e9 \U0001F600 unknown bytes", "we're, you've, they'll, I'd, I'm"]


def corpus():
    """Small TinyStories-like lines for the tokenizer (deterministic)."""
    names, things = ["Mia", "Tom", "Rosa", "Leo", "Ann", "Sam"], ["ball", "kite", "cat", "dog", "book", "cake"]
    colours = ["red", "blue", "green", "orange", "grey", "pink"]
    lines = []
    for i in range(600):
        n, t, c = names[i % 6], things[(i // 6) % 6], colours[(i // 36) % 6]
        lines.append(f"{n} has a {c} {t}. What colour is {n}'s {t}? It is {c}, {i % 97} times in 2025!")
    return lines


def train_tokenizer(path, vocab_size):
    """Byte-level BPE the way RxNN's TokenizerTrainer makes it (BPE with [UNK], ByteLevel(add_prefix_space=True), the
    RxT specials first; no post-processor, no decoder)."""
    tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(corpus(), BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, limit_alphabet=1000,
                                                 show_progress=False))
    tok.save(path)
    return tok.get_vocab_size()


@torch.no_grad()
def randomize(module, seed, bf16=False):
    """Every parameter random, at a scale that keeps activations O(1): norms 1 +- 0.2, biases 0.1 N(0,1), gate
    biases N(0,1) (gates far from 0.5), matrices N(0,1) / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        elif name.endswith("bias"):
            p.copy_(r if "gate" in name else 0.1 * r)
        elif p.dim() >= 2:
            p.copy_(r / p.size(-1) ** 0.5)
        else:  # static / elementwise gates
            p.copy_(r)
        if bf16:
            p.copy_(p.bfloat16().float())


def components(vocab, groups, query_groups, head_norm):
    common = dict(num_layers=L, vocab_size=vocab, embed_dim=D, att_heads=H, att_groups=groups,
                  att_query_groups=query_groups, seq_len=64, stm_size=S, use_flash_attention=False, use_gated=True,
                  ff_activation="silu", self_att_type="sqa", cross_att_type="sqa")
    enc = RxTEncoder(ff_dim=16, skip_memory_cross_attention=True, **common)
    dec = RxTDecoder(ff_dim=8, use_moe=True, num_experts=4, moe_top_k=2, use_head_norm=head_norm, **common)
    mem = RxTInterlayerMemoryAttention(**memattn_common(groups, query_groups), interlayer_att_groups=groups,
                                       interlayer_att_query_groups=query_groups, residual_gate_type="linear",
                                       residual_per_slot_gate=True)
    return enc, dec, mem


def memattn_common(groups, query_groups):
    return dict(num_layers=L, embed_dim=D, att_heads=H, seq_len=64, stm_size=S, att_groups=groups,
                att_query_groups=query_groups, use_gated_residual=True, use_tanh_residual_gate=False)


@torch.no_grad()
def record(enc, dec, mem, mlm, ids, mask, stm):
    for m in (enc, dec, mem) + ((mlm,) if mlm else ()):
        m.eval()
    _, ed = enc(ids, attention_mask=mask)  # (L, B, T, D)
    mem.model.stm.update_all(stm.clone())
    new_stm = mem(ed, attention_mask=mask).clone()
    dec.model.stm.update_all(stm.clone())
    out = dict(ed=ed, new_stm=new_stm, logits=dec(ids, attention_mask=mask))
    if mlm is not None:
        out["mlm"] = mlm(ed[-1])
    return out


def save(module, path):
    shutil.rmtree(path, ignore_errors=True)
    module.save_pretrained(path)
    os.remove(os.path.join(path, "README.md"))  # the hub's generic model card: nothing a converter reads


def reinterleave(w, hd):
    """Rows of each head from RxNN's order into the order that makes rxlm >= 0.3.40 compute the same scores: row j of
    the half-split layout [even | odd] goes back to its interleaved place."""
    n = w.size(0) // hd
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    out = torch.empty_like(w).view(n, hd, -1)
    out[:, perm] = w.view(n, hd, -1)  # the inverse of nanoRxT's rows[perm]
    return out.view_as(w)


def to_rxlm3(src, dst):
    """Rewrite the saved RxNN set `src` as rxlm >= 0.3.40 writes it (see the docstring), bf16."""
    shutil.rmtree(dst, ignore_errors=True)
    hd = D // H
    for part in ("encoder", "decoder", "memory_attention"):
        os.makedirs(os.path.join(dst, part))
        cfg = json.load(open(os.path.join(src, part, "config.json")))
        w = load_file(os.path.join(src, part, "model.safetensors"))
        if part == "encoder":
            del w["model.stm.memory"]  # rxlm >= 0.3.39: the encoder has no STM
        if part == "decoder":
            cfg.update(use_vectorized_moe=True, num_shared_experts=0, moe_bias_mode="global",
                       head_norm_type="layer_norm")
            for l in range(L):
                p = f"model.layers.{l}.ff."
                E = cfg["num_experts"]
                fc1 = [w.pop(f"{p}experts.{e}.fc1.linear.weight") for e in range(E)]
                b1 = [w.pop(f"{p}experts.{e}.fc1.linear.bias") for e in range(E)]
                fc2 = [w.pop(f"{p}experts.{e}.fc2.weight") for e in range(E)]
                b2 = [w.pop(f"{p}experts.{e}.fc2.bias") for e in range(E)]
                assert all(not b.any() for b in b1) and all(torch.equal(b, b2[0]) for b in b2)
                w[p + "w1"] = torch.stack([x.t() for x in fc1]).contiguous()  # (E, D, 2H), [l | g] as in fc1
                w[p + "w2"] = torch.stack([x.t() for x in fc2]).contiguous()  # (E, H, D)
                w[p + "global_bias"] = b2[0]
                k = f"model.layers.{l}.memory_cross_attention.k_proj.weight"
                w[k] = reinterleave(w[k], hd)
        if part == "memory_attention":
            cfg["rope_base"] = 10000
            for l in range(L):
                k = f"model.attention_layers.{l}.q_proj.weight"
                w[k] = reinterleave(w[k], hd)
        json.dump(cfg, open(os.path.join(dst, part, "config.json"), "w"), indent=2, sort_keys=True)
        # weights bf16, the RoPE buffers fp32 (in bf16 the cached angles would be off by up to 0.1 rad)
        save_file({k: (v if ".rope." in k else v.to(torch.bfloat16)).contiguous() for k, v in w.items()},
                  os.path.join(dst, part, "model.safetensors"), metadata={"format": "pt"})


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    tmp = os.path.join(OUT, "tokenizer.json")
    V = train_tokenizer(tmp, vocab_size=112)
    hf = PreTrainedTokenizerFast(tokenizer_file=tmp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(len(SPECIALS), V, (B, T), generator=g)
    ids[:, :2] = torch.tensor([2, 5])  # [BOS][Q]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:] = 0
    ids[1, -4:] = 0  # [PAD]
    stm = torch.randn(L, B, S, D, generator=g)
    ref = dict(ids=ids, mask=mask, stm=stm, vocab_size=V, rxnn_version="0.2.171",
               tokenizer=[(t, hf.encode(t, add_special_tokens=False)) for t in TEXTS + corpus()[:40]])

    # rxnn: the Micro-SMAT kinds, legacy experts with biases
    torch.manual_seed(0)
    enc, dec, mem = components(V, groups=1, query_groups=2, head_norm=False)
    mlm = MLMHead(embed_dim=D, vocab_size=V)
    for i, m in enumerate((enc, dec, mem, mlm)):
        randomize(m, 100 + i)
    with torch.no_grad():
        dec.model.embedding.weight.copy_(enc.model.embedding.weight)  # shared, as RxTAlpha shares it
    ref["rxnn"] = record(enc, dec, mem, mlm, ids, mask, stm)
    for name, m in (("encoder", enc), ("decoder", dec), ("memory_attention", mem), ("mlm_head", mlm)):
        save(m, os.path.join(OUT, "rxnn", name))
    shutil.move(tmp, os.path.join(OUT, "rxnn", "decoder", "tokenizer.json"))

    # the same input through other memory-attention variants (memory attention only; rxnn's ED)
    variants = {"memattn_simple": RxTSimpleMemoryAttention(**memattn_common(1, 2), residual_gate_type="static",
                                                           residual_per_slot_gate=False),
                "memattn_self": RxTSelfMemoryAttention(**memattn_common(1, 2), self_att_groups=1,
                                                       self_att_query_groups=2, residual_gate_type="elementwise",
                                                       residual_per_slot_gate=True, use_gate_for_self_attention=True)}
    for i, (name, m) in enumerate(variants.items()):
        randomize(m, 200 + i)
        m.eval()
        m.model.stm.update_all(stm.clone())
        with torch.no_grad():
            ref[name] = dict(new_stm=m(ref["rxnn"]["ed"], attention_mask=mask).clone())
        save(m, os.path.join(OUT, name, "memory_attention"))

    # rxlm3: a second model, recorded in fp32 on bf16-rounded weights, written in rxlm >= 0.3.40's layout
    torch.manual_seed(1)
    enc, dec, mem = components(V, groups=1, query_groups=1, head_norm=True)
    for i, m in enumerate((enc, dec, mem)):
        randomize(m, 300 + i, bf16=True)
    with torch.no_grad():
        dec.model.embedding.weight.copy_(enc.model.embedding.weight)
        for layer in dec.model.layers:  # what one global bias can express: no fc1 biases, one shared fc2 bias
            for e in layer.ff.experts:
                e.fc1.linear.bias.zero_()
                e.fc2.bias.copy_(layer.ff.experts[0].fc2.bias)
    ref["rxlm3"] = record(enc, dec, mem, None, ids, mask, stm)
    tmp = os.path.join(OUT, "_rxnn_b")
    for name, m in (("encoder", enc), ("decoder", dec), ("memory_attention", mem)):
        save(m, os.path.join(tmp, name))
    to_rxlm3(tmp, os.path.join(OUT, "rxlm3"))
    shutil.rmtree(tmp)

    torch.save(ref, os.path.join(OUT, "reference.pt"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {size / 1024:.0f} kB; vocab {V}; |logits| max "
          f"{ref['rxnn']['logits'][mask.bool()].abs().max():.2f}")


if __name__ == "__main__":
    sys.exit(main())
