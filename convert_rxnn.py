"""
Load the published RxT-Alpha weights: Reactive AI's RxNN / RxLM component checkpoints in, one ordinary nanoRxT
checkpoint out, which chat.py, evaluate.py, bench.py and the training scripts (init_from=) load like any other.

    python convert_rxnn.py --encoder=RxT-Alpha-Micro-Encoder-SMAT --decoder=RxT-Alpha-Micro-Decoder-SMAT \\
        --memory_attention=RxT-Alpha-Micro-MemAttn-SMAT --out=out/rxt-alpha-micro/ckpt.pt
    python chat.py --ckpt=out/rxt-alpha-micro/ckpt.pt

A component directory is what the libraries' save_pretrained (PyTorchModelHubMixin) writes: config.json (the
constructor's keyword arguments) and model.safetensors. Optional: --mlm_head=DIR (the encoder's MLM head; without it the
checkpoint gets a fresh one, which only MLM training reads), --tokenizer=FILE (default: the decoder directory's
tokenizer.json; converted by data.tokenizer.Tokenizer.from_hf_json and carried in the checkpoint), --rope (below),
--embedding (below).

Top to bottom: read safetensors (the format is simple enough to read here: no new dependency) -> read the config.json
files and refuse what nanoRxT does not compute -> ModelConfig -> the RoPE convention -> every nanoRxT tensor from the
table KEYS -> nothing left over, nothing missing -> training.save_checkpoint. Every problem is one line (`error: ...`),
exit 1, and nothing is written.

Where the reference computes differently, and what honours it (tests/test_convert_rxnn.py checks each against outputs
recorded from RxNN 0.2.171):
  - separate q/k/v projections: fused into nanoRxT's [q | k | v] (same head order, same grouping of query heads);
  - RoPE: the pairs it rotates (the rows are reordered, below);
  - the SwiGLU: the reference computes l * silu(g) from [l | g], nanoRxT silu(g) * u from [g | u]: halves swapped;
    its biases (encoder, experts): ModelConfig.ff_bias / expert_bias; rxlm's one global MoE bias: moe_out_bias;
  - experts: one GatedFeedForward per expert (RxNN, rxlm < 0.3.10), or rxlm's stacked w1 (E, D, 2H), w2 (E, H, D);
  - no norm before the LM head (final_norm="none"), or a LayerNorm with use_head_norm ("layer");
  - interlayer memory attention normalises the mean of the layers with one norm shared by all layers: copied into
    each layer's pre_norm_kv; gates: the reference's static (S, 1) or (1,), elementwise per slot (S, 1) and linear
    Linear(S, S) or Linear(S, 1) gates are nanoRxT's static, per-slot (no bias) and linear gates, the per-layer ones
    repeated for every slot;
  - RoPE buffers (rope.inv_freq / rope.cache) are recomputed (checked against the file), the stored STM
    (model.stm.memory: whatever memory was live when it was saved) is dropped: a conversation starts from
    model.new_memory, N(0, 0.02^2) as RxNN's 'normal' init.

RoPE conventions. RxNN (<= 0.2.171) and rxlm < 0.3.40 rotate the interleaved pairs (2i, 2i+1) of a head and write the
result half-split, [rotated evens | rotated odds] (torch.cat); rxlm >= 0.3.40 writes it interleaved (torch.stack).
nanoRxT rotates the half-split pairs (i, i + hd/2). Reordering a projection's rows head by head as [0, 2, 4, ...,
1, 3, 5, ...] makes nanoRxT's rotation the reference's:
  rxnn   the rotated side only: self-attention q and k, the decoder's memory-read q, the memory write's k (the side
         RoPE leaves alone is then in the same order as the reference's);
  rxlm3  q and k wherever RoPE is used (the rotated side comes out interleaved, so the other side must be reordered
         too for the dot product to pair the same numbers).
Self-attention is the same either way. Where RoPE touches one side only (the decoder's memory cross-attention, the
memory attention) the two differ, and a checkpoint read with the wrong one answers differently. --rope=auto decides
from the files: a memory-attention config with rope_base (rxlm >= 0.3.61) or any config with legacy_stm_in_encoder
means rxlm3; otherwise an encoder that stores an STM buffer was written by RxNN or rxlm < 0.3.39 (rxnn), one without
by rxlm >= 0.3.39 (rxlm3; wrong only for rxlm 0.3.39 itself: --rope=rxnn).

Refused (one line naming the component and the feature): self-interlayer memory attention, tanh or slot-status
residual gates, memory norms other than classic-rms, LayerNorm models, non-gated or non-SiLU feed-forwards, dense
decoders, shared experts, use_flash_attention, encoders with memory cross-attention, attention types other than
MHA/GQA/MQA/SQA, fewer query than key/value heads, RoPE-free models, linear/gated attention and stateless layers of
later rxlm, config keys this file does not know, tensors in dtypes other than F32/F16/BF16/F64, and any tensor left
over or missing after the mapping. (The reference library's own from_pretrained loads non-strictly and can leave
experts random without a word; this never does.)

--embedding: nanoRxT has one embedding (encoder, decoder and so the memory share it, as RxTAlpha shares it); the
encoder's and the decoder's copies must be equal, or one of them chosen (--embedding=encoder or decoder).
"""

import json
import os

import numpy as np
import torch

import cli
import training
from data.tokenizer import Tokenizer
from model import ModelConfig, ReactiveTransformer

DEFAULTS = dict(
    encoder="",  # component directories (config.json + model.safetensors each)
    decoder="",
    memory_attention="",
    mlm_head="",  # optional
    tokenizer="",  # tokenizer.json; "" = the decoder directory's, if it has one
    rope="auto",  # auto | rxnn | rxlm3 (see the docstring)
    embedding="check",  # check: encoder and decoder embeddings must be equal | encoder | decoder: use that one
    out="out/rxt-alpha/ckpt.pt",
)

# -----------------------------------------------------------------------------
# safetensors: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw tensors
# (little-endian) at those offsets after the header. bf16 is the top half of an fp32: shifted back, it is exact.

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_safetensors(path, where):
    """{name: fp32 tensor} of a .safetensors file; `where` names the component in errors."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        assert len(data) >= 8 + n and isinstance(header, dict)
    except (ValueError, AssertionError):
        raise cli.CheckpointError(f"{where}: {path} is not a safetensors file (or is cut short)")
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        try:
            kind, shape, (start, end) = info["dtype"], info["shape"], (8 + n + o for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise cli.CheckpointError(f"{where}: {path} is damaged (tensor {name} has no dtype, shape or offsets)")
        if kind not in DTYPES:
            raise cli.CheckpointError(f"{where}: tensor {name} is {kind}; only F32, F16, BF16 and F64 are read (a "
                                      f"quantized checkpoint?)")
        dtype, count = np.dtype(DTYPES[kind]), int(np.prod(shape))
        if end > len(data) or end - start != count * dtype.itemsize:
            raise cli.CheckpointError(f"{where}: {path} is damaged (tensor {name} runs past the file or has the "
                                      f"wrong size)")
        a = np.frombuffer(data, dtype=dtype, count=count, offset=start)
        if kind == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = torch.from_numpy(a.astype(np.float32)).reshape(shape)
    return tensors


# -----------------------------------------------------------------------------
# Components


class Component:
    """One directory as save_pretrained writes it: its config (dict) and tensors (dict), and which tensors were used."""

    KINDS = {"encoder": "an encoder", "decoder": "a decoder", "memory_attention": "a memory attention",
             "mlm_head": "an MLM head"}

    def __init__(self, role, path):
        self.role, self.path, self.used = role, path, set()
        if not os.path.isdir(path):
            raise cli.CheckpointError(f"{role}: {path} is not a directory (a component is config.json + "
                                      f"model.safetensors, as save_pretrained writes them)")
        for name in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(path, name)):
                raise cli.CheckpointError(f"{role}: {name} not found in {path}")
        try:
            with open(os.path.join(path, "config.json")) as f:
                self.config = json.load(f)
            assert isinstance(self.config, dict)
        except (ValueError, AssertionError):
            raise cli.CheckpointError(f"{role}: {path}/config.json is not a JSON object")
        self.tensors = read_safetensors(os.path.join(path, "model.safetensors"), role)
        kind = self.kind()
        if kind != role:
            raise cli.CheckpointError(f"{role}: {path} holds {self.KINDS.get(kind, 'no RxT component I know')}, "
                                      f"not {self.KINDS[role]}")

    def kind(self):
        has = lambda key: key in self.tensors
        if has("model.attention_layers.0.q_proj.weight"):
            return "memory_attention"
        if has("model.head.weight"):
            return "decoder"
        if has("model.embedding.weight") and has("model.layers.0.attention.q_proj.weight"):
            return "encoder"
        if has("dense.weight") and has("decoder.weight"):
            return "mlm_head"
        return None

    def refuse(self, what):
        raise cli.CheckpointError(f"{self.role} ({self.path}): {what}")

    def get(self, key):
        self.used.add(key)
        return self.tensors[key]

    def tensor(self, key):
        """A tensor the conversion cannot do without (its absence is an error, not a KeyError)."""
        if key not in self.tensors:
            self.refuse(f"tensor {key} is missing")
        return self.tensors[key]

    def heads(self, key, hd):
        """Number of heads of a projection (n * hd, D)."""
        rows = self.tensor(key).size(0)
        if rows == 0 or rows % hd:
            self.refuse(f"{key} has {rows} rows, not a multiple of the head size {hd} (att_heads in config.json?)")
        return rows // hd


# -----------------------------------------------------------------------------
# config.json: what each key decides. Decoder and encoder configs hold only the arguments their author passed; a key
# left out takes the library's default, given here where it matters (the same in RxNN 0.2.171 and rxlm 0.3.80).
# A key this file does not know is refused: it may change the computation.

LIBRARY_DEFAULTS = dict(att_heads=16, moe_top_k=1, ff_activation="swish", use_flash_attention=False, rope_base=10000)
ATTENTION_TYPES = ("mha", "gqa", "mqa", "sqa")  # RxNN's experimental gma / dma are not implemented
# read, or told by the weights themselves (shapes, which tensors exist) and checked against them
COMPONENT_READ = {"num_layers", "vocab_size", "embed_dim", "ff_dim", "att_heads", "seq_len", "stm_size", "att_groups",
                  "att_query_groups", "cross_att_groups", "cross_att_query_groups", "use_moe", "num_experts",
                  "moe_top_k", "use_gated", "use_rms_norm", "use_head_norm", "head_norm_type",
                  "skip_memory_cross_attention", "use_vectorized_moe", "num_shared_experts", "shared_expert_dim",
                  "moe_bias_mode", "moe_shared_experts_bias_mode", "use_attention_output_bias", "legacy_stm_in_encoder",
                  "rope_base"}
# training-time or implementation choices, or settings of features refused elsewhere
COMPONENT_IGNORED = {"ff_dropout", "att_dropout", "init_identity_norm", "att_experts", "att_query_experts",
                     "router_amp", "router_dtype", "vectorized_moe_from_legacy", "moe_grouped_gemm",
                     "moe_use_cutlass_grouped_gemm", "moe_use_weighted_shared_experts", "dense_layer_dim",
                     "gated_attention_activation",
                     "linear_attn_mode", "linear_attn_expand_k", "linear_attn_expand_v", "linear_attn_use_short_conv",
                     "linear_attn_conv_size", "linear_attn_use_gate", "linear_attn_norm_eps", "linear_attn_heads"}
# key: (the values nanoRxT computes, what another value would be)
COMPONENT_MUST_BE = {
    "use_flash_attention": ([False], "flash-attn kernels (RxNN called them on a transposed layout)"),
    "ff_activation": (["silu", "swish"], "a feed-forward activation other than SiLU"),
    "self_att_type": (list(ATTENTION_TYPES), "experimental self-attention"),
    "cross_att_type": (list(ATTENTION_TYPES), "experimental memory cross-attention"),
    "use_nope": ([False], "attention without RoPE"),
    "use_gated_attention": ([False], "gated attention"),
    "use_gated_cross_attention": ([None, False], "gated memory cross-attention"),
    "attn_layer_types": ([None], "per-layer attention types (linear attention)"),
    "stateless_attn_layer_types": ([None], "stateless layers"),
    "final_stateless_attn_layer_types": ([None], "stateless layers"),
    "stateless_layers_config": ([None, []], "stateless layers"),
    "final_stateless_layers_config": ([None, []], "stateless layers"),
}
MEMATTN_READ = {"num_layers", "embed_dim", "att_heads", "seq_len", "stm_size", "att_groups", "att_query_groups",
                "interlayer_att_groups", "interlayer_att_query_groups", "self_att_groups", "self_att_query_groups",
                "use_gated_residual", "use_tanh_residual_gate", "residual_per_slot_gate", "residual_gate_type",
                "use_gate_for_self_attention", "rope_base"}
MEMATTN_IGNORED = {"att_dropout", "interlayer_att_dropout", "self_att_dropout", "att_experts", "att_query_experts",
                   "interlayer_att_experts", "interlayer_att_query_experts", "self_att_experts",
                   "self_att_query_experts", "norm_init_gate", "norm_per_dim_scale", "norm_decay", "residual_gate_init",
                   "debug_mode", "debug_interval"}
MEMATTN_MUST_BE = {
    "use_flash_attention": ([False], "flash-attn kernels"),
    "att_type": (list(ATTENTION_TYPES), "experimental memory attention"),
    "interlayer_att_type": (list(ATTENTION_TYPES), "experimental interlayer attention"),
    "self_att_type": (list(ATTENTION_TYPES), "experimental memory self-attention"),
    "norm_type": (["classic-rms"], "a memory norm other than classic-rms (nn.RMSNorm)"),
    "residual_gate_type": (["static", "elementwise", "linear"], "an unknown residual gate"),
    "residual_gate_slot_status_type": (["mean"], "slot-status residual gates (a Linear(D, 1) per slot)"),
    "disable_residual": ([False], "a memory write without residual"),
}


def check_config(part, read, ignored, must_be):
    """Refuse a config key that is unknown, or set to something nanoRxT does not compute."""
    for key, value in part.config.items():
        if key in must_be and value not in must_be[key][0]:
            part.refuse(f"{key}={json.dumps(value)} means {must_be[key][1]}, which nanoRxT does not implement")
        if key not in read | ignored | set(must_be):
            part.refuse(f"config key {key!r} is unknown to this converter (a newer library?): refusing rather than "
                        f"guessing what it changes")


def setting(part, key, number=False):
    """A config value, or the library's default where the config leaves it out; number: a positive one."""
    if key not in part.config and key not in LIBRARY_DEFAULTS:
        part.refuse(f"config.json has no {key!r}")
    value = part.config.get(key, LIBRARY_DEFAULTS.get(key))
    if number and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        part.refuse(f"{key}={json.dumps(value)} in config.json: not a positive number")
    return value


# the memory attention's pre-step in the reference's key names, by variant
PRE = {"interlayer": "mean_", "self": "self_", "simple": ""}


def memory_variant(mem):
    """simple | self | interlayer, from which tensors the memory attention has."""
    has = lambda prefix: any(k.startswith(prefix) for k in mem.tensors)
    if has("model.interlayer_gate_layers."):
        mem.refuse("self-interlayer memory attention (a gate that mixes own layer and mean) is not implemented in "
                   "nanoRxT")
    if has("model.mean_attention_layers."):
        return "interlayer"
    if has("model.self_attention_layers."):
        if mem.config.get("use_gate_for_self_attention", False) != mem.config.get("use_gated_residual", False):
            mem.refuse("self memory attention with a different gate on the self step than on the write is not "
                       "implemented in nanoRxT (one gate_type for both)")
        return "self"
    return "simple"


def gate_type(mem):
    """nanoRxT's gate_type for the reference's ResidualGate settings (the same for the pre-step and the write)."""
    c = mem.config
    if not c.get("use_gated_residual", False):
        return "none"  # plain residual STM + Update
    if c.get("use_tanh_residual_gate", True):
        mem.refuse("use_tanh_residual_gate=true: tanh residual gates ((1 + g) * new + (1 - g) * old) are not "
                   "implemented in nanoRxT")
    kind, per_slot = c.get("residual_gate_type", "static"), c.get("residual_per_slot_gate", True)
    if kind == "elementwise" and not per_slot:
        mem.refuse("elementwise residual gates per layer (one gate from the mean of all slots) are not implemented "
                   "in nanoRxT")
    return {"static": "static", "elementwise": "per-slot", "linear": "linear"}[kind]


def model_config(enc, dec, mem, mlm, rope_base):
    """ModelConfig from the three configs, checked against the weights; refuses what nanoRxT does not compute."""
    for part in (enc, dec):
        check_config(part, COMPONENT_READ, COMPONENT_IGNORED, COMPONENT_MUST_BE)
        if "model.layers.0.norm1.bias" in part.tensors:
            part.refuse("LayerNorm layers (use_rms_norm=false) are not implemented in nanoRxT")
        if "model.layers.0.ff.fc1.weight" in part.tensors or "model.layers.0.ff.experts.0.fc1.weight" in part.tensors:
            part.refuse("a non-gated feed-forward (use_gated=false) is not implemented in nanoRxT")
    check_config(mem, MEMATTN_READ, MEMATTN_IGNORED, MEMATTN_MUST_BE)
    if any(k.startswith("model.layers.0.memory_cross_attention.") for k in enc.tensors):
        enc.refuse("an encoder with memory cross-attention (skip_memory_cross_attention=false: RxNN reads the STM "
                   "stored in the encoder file, not the live one) is not implemented in nanoRxT")
    if not any(k.startswith("model.layers.0.ff.experts.") or k == "model.layers.0.ff.w1" for k in dec.tensors):
        dec.refuse("a dense decoder feed-forward (use_moe=false) is not implemented in nanoRxT (only MoE decoders)")
    if any(".shared_expert" in k for k in dec.tensors):
        dec.refuse("shared experts (num_shared_experts > 0) are not implemented in nanoRxT")

    D, L, H = (setting(enc, k, number=True) for k in ("embed_dim", "num_layers", "att_heads"))
    for part in (dec, mem):
        for key, value in (("embed_dim", D), ("num_layers", L), ("att_heads", H)):
            if setting(part, key, number=True) != value:
                part.refuse(f"{key}={setting(part, key)}, the encoder's is {value}: the components do not belong "
                            f"together")
    if mlm is not None and (mlm.config.get("embed_dim") != D or
                            mlm.config.get("vocab_size") != enc.tensor("model.embedding.weight").size(0)):
        mlm.refuse("its embed_dim / vocab_size are not the encoder's")
    if D % H or (D // H) % 2:
        enc.refuse(f"embed_dim {D} / att_heads {H}: RoPE needs an even head size")
    hd, S = D // H, setting(mem, "stm_size", number=True)
    if setting(dec, "stm_size", number=True) != S:
        dec.refuse(f"stm_size={setting(dec, 'stm_size')}, the memory attention's is {S}")
    # heads from the projections' shapes (the meaning of the group settings drifted between library versions)
    q_kv = lambda part, prefix: (part.heads(prefix + "q_proj.weight", hd), part.heads(prefix + "k_proj.weight", hd))
    self_heads = q_kv(enc, "model.layers.0.attention.")
    if q_kv(dec, "model.layers.0.attention.") != self_heads:
        dec.refuse(f"self-attention heads (query, key/value) {q_kv(dec, 'model.layers.0.attention.')}, the encoder's "
                   f"are {self_heads}: nanoRxT gives both the same")
    variant = memory_variant(mem)
    memory = {q_kv(dec, "model.layers.0.memory_cross_attention."), q_kv(mem, "model.attention_layers.0.")}
    if variant != "simple":  # the pre-step's attention: STM -> mean of the layers, or STM -> itself
        memory.add(q_kv(mem, f"model.{PRE[variant]}attention_layers.0."))
    if len(memory) > 1 or not (memory == {self_heads} or all(q == kv for q, kv in memory)):
        mem.refuse(f"memory attention heads {sorted(memory)} (query, key/value): nanoRxT reads and writes the STM with "
                   f"one head layout, the self-attention's {self_heads} or equal query and key/value heads")
    (mq, mkv), = memory
    for q, kv, part in ((*self_heads, enc), (mq, mkv, mem)):
        if q % kv:
            part.refuse(f"{q} query heads over {kv} key/value heads: nanoRxT needs a multiple")
    legacy = "model.layers.0.ff.w1" not in dec.tensors
    w1 = dec.tensor("model.layers.0.ff.experts.0.fc1.linear.weight" if legacy else "model.layers.0.ff.w1")
    n_experts = sum(k.endswith(".fc1.linear.weight") and k.startswith("model.layers.0.ff.experts.")
                    for k in dec.tensors) if legacy else w1.size(0)
    if dec.config.get("num_experts", n_experts) != n_experts:
        dec.refuse(f"num_experts={dec.config['num_experts']} but the file holds {n_experts} experts per layer")
    head_norm = "layer" if "model.head_norm.bias" in dec.tensors else "rms" if "model.head_norm.weight" in dec.tensors \
        else "none"
    if dec.config.get("use_head_norm", head_norm != "none") != (head_norm != "none"):
        dec.refuse(f"use_head_norm={json.dumps(dec.config['use_head_norm'])}, but the file "
                   f"{'has no' if head_norm == 'none' else 'has a'} head norm")
    try:
        return ModelConfig(
            vocab_size=enc.tensor("model.embedding.weight").size(0), d_model=D, n_layers=L, n_heads=H,
            n_q_heads=self_heads[0], n_kv_heads=self_heads[1],
            enc_ff_dim=enc.tensor("model.layers.0.ff.fc2.weight").size(1), n_experts=n_experts,
            top_k=setting(dec, "moe_top_k", number=True), expert_dim=(w1.size(0) if legacy else w1.size(-1)) // 2,
            seq_len=setting(dec, "seq_len", number=True), stm_size=S,
            memory_attention=variant, gate_type=gate_type(mem), rope_base=float(rope_base),
            memory_heads=0 if mq == self_heads[0] and mkv == self_heads[1] else mq,
            ff_bias="model.layers.0.ff.fc1.linear.bias" in enc.tensors,
            expert_bias="model.layers.0.ff.experts.0.fc1.linear.bias" in dec.tensors or
                        "model.layers.0.ff.b1" in dec.tensors,
            moe_out_bias="model.layers.0.ff.global_bias" in dec.tensors, final_norm=head_norm)
    except (ValueError, TypeError) as e:
        raise cli.CheckpointError(f"the components describe a model nanoRxT cannot build: {e}")


def rope_convention(enc, dec, mem, flag):
    """(rxnn | rxlm3, why) from --rope or, with auto, from the files (see the docstring)."""
    if flag != "auto":
        return flag, "--rope"
    if "rope_base" in mem.config:
        return "rxlm3", "the memory-attention config has rope_base (rxlm >= 0.3.61)"
    if any("legacy_stm_in_encoder" in p.config for p in (enc, dec)):
        return "rxlm3", "a config has legacy_stm_in_encoder (rxlm >= 0.3.39)"
    if "model.stm.memory" in enc.tensors:
        return "rxnn", "the encoder stores an STM buffer (RxNN or rxlm < 0.3.39)"
    return "rxlm3", "the encoder stores no STM buffer (rxlm >= 0.3.39)"


# -----------------------------------------------------------------------------
# The key table: every nanoRxT tensor <- (component, the reference's key(s), how). In a reference key, {l} is the layer,
# {e} every expert (stacked), {q,k,v} the three projections (fused), {pre} the memory attention's pre-step
# (mean_: interlayer, self_: self). Where a nanoRxT key has several rows, the first whose keys the files hold is used.
# How:
#   copy       as it is
#   qkv WHERE  [q | k | v] stacked, RoPE rows reordered per ROTATED[convention][WHERE]
#   glu        the halves of a SwiGLU's first Linear (weight (2H, D) or bias) swapped: [l | g] -> [g | l]
#   glu experts  the same for each expert, transposed and stacked: (E, D, 2H), biases (E, 2H)
#   glu stacked  the same on the last dim of rxlm's w1 (E, D, 2H) / b1 (E, 2H)
#   experts    each expert's second matrix transposed and stacked (E, H, D), or its bias stacked (E, D)
#   gate       the gate in nanoRxT's shape: as it is, or a per-layer gate repeated for every slot
#   zeros      the reference has no such tensor (an elementwise gate has no bias)

KEYS = [
    ("embed.weight", "encoder", "model.embedding.weight", "copy"),
    # encoder (RxTEncoder): pre-norm bidirectional self-attention -> dense SwiGLU
    ("encoder.layers.{l}.norm1.weight", "encoder", "model.layers.{l}.norm1.weight", "copy"),
    ("encoder.layers.{l}.attn.qkv_proj.weight", "encoder", "model.layers.{l}.attention.{q,k,v}_proj.weight",
     "qkv self"),
    ("encoder.layers.{l}.attn.out_proj.weight", "encoder", "model.layers.{l}.attention.out_proj.weight", "copy"),
    ("encoder.layers.{l}.attn.out_proj.bias", "encoder", "model.layers.{l}.attention.out_proj.bias", "copy"),
    ("encoder.layers.{l}.norm2.weight", "encoder", "model.layers.{l}.norm3.weight", "copy"),
    ("encoder.layers.{l}.ff.w_gate_up.weight", "encoder", "model.layers.{l}.ff.fc1.linear.weight", "glu"),
    ("encoder.layers.{l}.ff.w_gate_up.bias", "encoder", "model.layers.{l}.ff.fc1.linear.bias", "glu"),
    ("encoder.layers.{l}.ff.w_down.weight", "encoder", "model.layers.{l}.ff.fc2.weight", "copy"),
    ("encoder.layers.{l}.ff.w_down.bias", "encoder", "model.layers.{l}.ff.fc2.bias", "copy"),
    # decoder (RxTDecoder): causal self-attention -> memory cross-attention (stm_norm on the STM) -> MoE -> head
    ("decoder.layers.{l}.norm1.weight", "decoder", "model.layers.{l}.norm1.weight", "copy"),
    ("decoder.layers.{l}.self_attn.qkv_proj.weight", "decoder", "model.layers.{l}.attention.{q,k,v}_proj.weight",
     "qkv self"),
    ("decoder.layers.{l}.self_attn.out_proj.weight", "decoder", "model.layers.{l}.attention.out_proj.weight", "copy"),
    ("decoder.layers.{l}.self_attn.out_proj.bias", "decoder", "model.layers.{l}.attention.out_proj.bias", "copy"),
    ("decoder.layers.{l}.norm2.weight", "decoder", "model.layers.{l}.norm2.weight", "copy"),
    ("decoder.layers.{l}.stm_norm.weight", "decoder", "model.layers.{l}.stm_norm.weight", "copy"),
    ("decoder.layers.{l}.cross_attn.qkv_proj.weight", "decoder",
     "model.layers.{l}.memory_cross_attention.{q,k,v}_proj.weight", "qkv read"),
    ("decoder.layers.{l}.cross_attn.out_proj.weight", "decoder",
     "model.layers.{l}.memory_cross_attention.out_proj.weight", "copy"),
    ("decoder.layers.{l}.cross_attn.out_proj.bias", "decoder", "model.layers.{l}.memory_cross_attention.out_proj.bias",
     "copy"),
    ("decoder.layers.{l}.norm3.weight", "decoder", "model.layers.{l}.norm3.weight", "copy"),
    ("decoder.layers.{l}.moe.router.weight", "decoder", "model.layers.{l}.ff.router.gate.weight", "copy"),
    #   legacy experts (RxNN, rxlm < 0.3.10): one GatedFeedForward each, with biases
    ("decoder.layers.{l}.moe.w_gate_up", "decoder", "model.layers.{l}.ff.experts.{e}.fc1.linear.weight",
     "glu experts"),
    ("decoder.layers.{l}.moe.b_gate_up", "decoder", "model.layers.{l}.ff.experts.{e}.fc1.linear.bias", "glu experts"),
    ("decoder.layers.{l}.moe.w_down", "decoder", "model.layers.{l}.ff.experts.{e}.fc2.weight", "experts"),
    ("decoder.layers.{l}.moe.b_down", "decoder", "model.layers.{l}.ff.experts.{e}.fc2.bias", "experts"),
    #   vectorised experts (rxlm >= 0.3.10): w1 (E, D, 2H) = [l | g], w2 (E, H, D); biases per expert or one global
    ("decoder.layers.{l}.moe.w_gate_up", "decoder", "model.layers.{l}.ff.w1", "glu stacked"),
    ("decoder.layers.{l}.moe.b_gate_up", "decoder", "model.layers.{l}.ff.b1", "glu stacked"),
    ("decoder.layers.{l}.moe.w_down", "decoder", "model.layers.{l}.ff.w2", "copy"),
    ("decoder.layers.{l}.moe.b_down", "decoder", "model.layers.{l}.ff.b2", "copy"),
    ("decoder.layers.{l}.moe.out_bias", "decoder", "model.layers.{l}.ff.global_bias", "copy"),
    ("decoder.norm.weight", "decoder", "model.head_norm.weight", "copy"),  # only with use_head_norm
    ("decoder.norm.bias", "decoder", "model.head_norm.bias", "copy"),
    ("decoder.lm_head.weight", "decoder", "model.head.weight", "copy"),
    ("decoder.lm_head.bias", "decoder", "model.head.bias", "copy"),
    # memory attention (RxT{Simple,Self,Interlayer}MemoryAttention): the pre-step (self or interlayer), then the write
    ("memory_attention.layers.{l}.pre_norm_q.weight", "memory_attention", "model.{pre}memory_norm_layers.{l}.weight",
     "copy"),
    ("memory_attention.layers.{l}.pre_norm_kv.weight", "memory_attention", "model.mean_stm_norm.weight", "copy"),
    ("memory_attention.layers.{l}.pre_norm_kv.weight", "memory_attention", "model.self_memory_norm_layers.{l}.weight",
     "copy"),  # self: one norm for queries and keys/values
    ("memory_attention.layers.{l}.pre_attn.qkv_proj.weight", "memory_attention",
     "model.{pre}attention_layers.{l}.{q,k,v}_proj.weight", "qkv plain"),
    ("memory_attention.layers.{l}.pre_attn.out_proj.weight", "memory_attention",
     "model.{pre}attention_layers.{l}.out_proj.weight", "copy"),
    ("memory_attention.layers.{l}.pre_attn.out_proj.bias", "memory_attention",
     "model.{pre}attention_layers.{l}.out_proj.bias", "copy"),
    ("memory_attention.layers.{l}.pre_gate.lin.weight", "memory_attention",
     "model.{pre}residual_gate_layers.{l}.gate.weight", "gate"),
    ("memory_attention.layers.{l}.pre_gate.lin.bias", "memory_attention",
     "model.{pre}residual_gate_layers.{l}.gate.bias", "gate"),
    ("memory_attention.layers.{l}.pre_gate.w", "memory_attention", "model.{pre}residual_gate_layers.{l}.gate", "gate"),
    ("memory_attention.layers.{l}.pre_gate.b", None, None, "zeros"),
    ("memory_attention.layers.{l}.norm_stm.weight", "memory_attention", "model.memory_norm_layers.{l}.weight", "copy"),
    ("memory_attention.layers.{l}.norm_ed.weight", "memory_attention", "model.memory_input_norm_layers.{l}.weight",
     "copy"),
    ("memory_attention.layers.{l}.attn.qkv_proj.weight", "memory_attention",
     "model.attention_layers.{l}.{q,k,v}_proj.weight", "qkv write"),
    ("memory_attention.layers.{l}.attn.out_proj.weight", "memory_attention",
     "model.attention_layers.{l}.out_proj.weight", "copy"),
    ("memory_attention.layers.{l}.attn.out_proj.bias", "memory_attention", "model.attention_layers.{l}.out_proj.bias",
     "copy"),
    ("memory_attention.layers.{l}.gate.lin.weight", "memory_attention", "model.residual_gate_layers.{l}.gate.weight",
     "gate"),
    ("memory_attention.layers.{l}.gate.lin.bias", "memory_attention", "model.residual_gate_layers.{l}.gate.bias",
     "gate"),
    ("memory_attention.layers.{l}.gate.w", "memory_attention", "model.residual_gate_layers.{l}.gate", "gate"),
    ("memory_attention.layers.{l}.gate.b", None, None, "zeros"),
    # MLM head (training only): dense -> GELU -> LayerNorm -> decoder, as nanoRxT's
    ("mlm_head.dense.weight", "mlm_head", "dense.weight", "copy"),
    ("mlm_head.dense.bias", "mlm_head", "dense.bias", "copy"),
    ("mlm_head.norm.weight", "mlm_head", "layer_norm.weight", "copy"),
    ("mlm_head.norm.bias", "mlm_head", "layer_norm.bias", "copy"),
    ("mlm_head.out.weight", "mlm_head", "decoder.weight", "copy"),
    ("mlm_head.out.bias", "mlm_head", "decoder.bias", "copy"),
]
# in the files, but not weights: recomputed (RoPE, checked against the file) or state (the STM live at save time)
IGNORED = (".rope.inv_freq", ".rope.cache", "model.stm.memory")
# which projections' rows are reordered for RoPE, by convention and attention (see the docstring)
ROTATED = {"rxnn": {"self": "qk", "read": "q", "write": "k", "plain": ""},
           "rxlm3": {"self": "qk", "read": "qk", "write": "qk", "plain": ""}}


def rope_rows(w, hd):
    """Rows of each head of a projection (n * hd, D) in the order [0, 2, 4, ..., 1, 3, 5, ...]: the reference's RoPE
    pairs (2i, 2i+1) become nanoRxT's (i, i + hd/2)."""
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return w.view(-1, hd, w.size(-1))[:, order].reshape(w.shape)


def swap_halves(t, dim):  # [l | g] -> [g | l]
    first, second = t.chunk(2, dim=dim)
    return torch.cat([second, first], dim=dim)


def transform(how, tensors, shape, rope, hd):
    """The nanoRxT tensor of `shape` from the reference's tensors (one, or one per projection or expert)."""
    if how == "copy":
        return tensors[0]
    if how.startswith("qkv"):
        rotated = ROTATED[rope][how.split()[1]]
        q, k, v = tensors
        return torch.cat([rope_rows(q, hd) if "q" in rotated else q, rope_rows(k, hd) if "k" in rotated else k, v])
    if how == "glu":
        return swap_halves(tensors[0], dim=0)
    if how == "glu experts":
        return swap_halves(transform("experts", tensors, shape, rope, hd), dim=-1)
    if how == "glu stacked":
        return swap_halves(tensors[0], dim=-1)
    if how == "experts":  # nn.Linear keeps (out, in); nanoRxT's experts multiply x @ w, (in, out)
        return torch.stack([t.t() if t.dim() == 2 else t for t in tensors])
    if how == "gate":  # (1,) -> (S, 1) or (S,), Linear(S, 1) -> Linear(S, S) rows, (S, 1) -> (S,)
        t = tensors[0]
        if t.numel() == torch.Size(shape).numel():
            return t.reshape(shape)
        return t.reshape([1] * (len(shape) - t.dim()) + list(t.shape)).expand(shape).clone()
    if how == "zeros":
        return torch.zeros(shape)
    raise AssertionError(how)


def row_keys(pattern, layer, n_experts, pre):
    """The reference keys of one table row for one layer."""
    key = pattern.replace("{l}", layer).replace("{pre}", pre)
    if "{q,k,v}" in key:
        return [key.replace("{q,k,v}", p) for p in "qkv"]
    if "{e}" in key:
        return [key.replace("{e}", str(e)) for e in range(n_experts)]
    return [key]


def convert_weights(model, parts, rope):
    """nanoRxT's state dict from the components' tensors, by the table; refuses missing and left-over tensors."""
    cfg = model.cfg
    pre = PRE[cfg.memory_attention]
    state = {}
    for key, target in model.state_dict().items():
        layer = key.split(".")[2] if key.split(".")[1] == "layers" else ""
        generic = key.replace(f".layers.{layer}.", ".layers.{l}.") if layer else key
        rows = [r for r in KEYS if r[0] == generic]
        if not rows:
            raise cli.CheckpointError(f"no rule for nanoRxT's {key} in convert_rxnn.KEYS")
        if rows[0][1] == "mlm_head" and "mlm_head" not in parts:
            state[key] = target  # no MLM head given: the fresh one (only MLM training reads it)
            continue
        found = None
        for _, role, pattern, how in rows:
            sources = [] if pattern is None else row_keys(pattern, layer, cfg.n_experts, pre)
            if role is None or all(s in parts[role].tensors for s in sources):
                found = role, sources, how
                break
        if found is None:
            role, pattern = rows[0][1], rows[0][2]
            missing = [s for s in row_keys(pattern, layer, cfg.n_experts, pre) if s not in parts[role].tensors]
            parts[role].refuse(f"tensor {missing[0]} is missing (nanoRxT's {key} needs it)")
        role, sources, how = found
        t = transform(how, [parts[role].get(s) for s in sources], target.shape, rope, cfg.head_dim)
        if t.shape != target.shape:
            parts[role].refuse(f"{sources[0]} has shape {tuple(t.shape)} where nanoRxT's {key} needs "
                               f"{tuple(target.shape)}: config and weights disagree")
        state[key] = t.contiguous()
    for part in parts.values():
        left = [k for k in part.tensors if k not in part.used and not k.endswith(IGNORED)]
        if left:
            part.refuse(f"{len(left)} tensor(s) have no place in nanoRxT, e.g. {left[0]} (a feature this converter "
                        f"does not implement)")
    return state


def check_rope_buffers(parts, cfg):
    """The files' RoPE frequencies must be the ones nanoRxT computes: the head size and rope_base are right."""
    hd = cfg.head_dim
    ours = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    for part in parts.values():
        for k in (k for k in part.tensors if k.endswith(".rope.inv_freq")):
            theirs = part.tensors[k]
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-2):
                part.refuse(f"{k} is not RoPE at head size {hd} and base {cfg.rope_base:g} (att_heads or rope_base "
                            f"in config.json do not match the weights)")


def shared_embedding(enc, dec, choice):
    """The one embedding nanoRxT keeps: the encoder's and the decoder's copies must agree unless one is chosen."""
    e, d = enc.get("model.embedding.weight"), dec.get("model.embedding.weight")
    if e.shape != d.shape:
        dec.refuse(f"embedding {tuple(d.shape)}, the encoder's is {tuple(e.shape)}: the components do not belong "
                   f"together")
    if choice == "check" and not torch.equal(e, d):
        dec.refuse(f"the decoder's embedding differs from the encoder's (max |diff| {(e - d).abs().max():.3g}); "
                   f"nanoRxT shares one: choose it with --embedding=encoder or --embedding=decoder")
    return d if choice == "decoder" else e


def convert(cfg):
    """Read, check and map everything; returns (model, tokenizer or None, RoPE convention, report lines). Writes
    nothing."""
    parts = {role: Component(role, cfg[role]) for role in ("encoder", "decoder", "memory_attention", "mlm_head")
             if cfg[role]}
    enc, dec, mem, mlm = parts["encoder"], parts["decoder"], parts["memory_attention"], parts.get("mlm_head")
    rope, why = rope_convention(enc, dec, mem, cfg["rope"])
    rope_bases = {setting(p, "rope_base", number=True) for p in (enc, dec, mem)}
    if len(rope_bases) > 1:
        mem.refuse(f"rope_base differs between the components: {sorted(rope_bases)}")
    mcfg = model_config(enc, dec, mem, mlm, rope_bases.pop())
    check_rope_buffers(parts, mcfg)
    torch.manual_seed(0)  # the fresh MLM head, if none is given
    model = ReactiveTransformer(mcfg)
    embedding = shared_embedding(enc, dec, cfg["embedding"])
    state = convert_weights(model, parts, rope)
    state["embed.weight"] = embedding
    training.load_weights(model, state, "converted weights")

    tok, tok_path = None, cfg["tokenizer"] or os.path.join(cfg["decoder"], "tokenizer.json")
    if cfg["tokenizer"] or os.path.isfile(tok_path):
        if not os.path.isfile(tok_path):
            raise cli.CheckpointError(f"tokenizer: {tok_path} not found")
        try:
            tok = Tokenizer.from_hf_json(tok_path)
        except (ValueError, KeyError, TypeError) as e:
            raise cli.CheckpointError(f"tokenizer: {e}")
        if tok.vocab_size > mcfg.vocab_size:
            raise cli.CheckpointError(f"tokenizer: {tok.vocab_size} ids, the model has {mcfg.vocab_size} embeddings")
    counts = model.param_counts()
    experts = "stacked w1/w2 (rxlm >= 0.3.10)" if "model.layers.0.ff.w1" in dec.tensors else "one per module (legacy)"
    report = [f"read {', '.join(f'{r} ({p.path})' for r, p in parts.items())}",
              f"experts: {experts}; RoPE convention {rope}: {why}",
              f"model: {mcfg}",
              f"parameters: encoder {counts['encoder']:,}, decoder {counts['decoder']:,} "
              f"({counts['decoder_active']:,} active), memory attention {counts['memory_attention']:,}"
              + ("" if mlm else "; MLM head: none given, a fresh one (only MLM training reads it)"),
              f"tokenizer: {tok_path if tok else 'none (chat.py and evaluate.py need one: --tokenizer=FILE)'}"]
    return model, tok, rope, report


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    cli.check(cfg, rope=((lambda v: v in ("auto", "rxnn", "rxlm3")), "auto, rxnn or rxlm3"),
              embedding=((lambda v: v in ("check", "encoder", "decoder")), "check, encoder or decoder"),
              out=((lambda v: isinstance(v, str) and v.endswith(".pt")), "a .pt path"))
    for role in ("encoder", "decoder", "memory_attention"):
        if not cfg[role]:
            raise cli.ConfigError(f"--{role}=DIR is required (a component directory: config.json + "
                                  f"model.safetensors)")
    model, tok, rope, report = convert(cfg)
    for line in report:
        print(line)
    sources = {role: os.path.abspath(cfg[role]) for role in ("encoder", "decoder", "memory_attention", "mlm_head")
               if cfg[role]}
    training.save_checkpoint(cfg["out"], model, stage="converted", step=0, tokenizer=tok,
                             cfg=dict(cfg, rope=rope, sources=sources))
    print(f"wrote {cfg['out']}: python chat.py --ckpt={cfg['out']}")


if __name__ == "__main__":
    cli.run(main)
