"""
nanoRxT: the Reactive Transformer (RxT) in one file.

RxT is a stateful, event-driven chat model. It never re-reads the conversation: everything it knows about earlier
turns lives in a fixed-size Short-Term Memory (STM). For every interaction (turn) t:
  1. generate - the decoder answers the query `[BOS][Q] query [A]`, reading the previous memory STM_{t-1} through
     memory cross-attention. Its self-attention sees only this interaction;
  2. update - afterwards (off the user's path) the encoder encodes the whole interaction
     `[BOS][Q] query [A] answer [EOS]` into encoded data ED_t, one tensor per layer, and the memory attention network
     writes it into memory: STM_t = MemAttn(STM_{t-1}, ED_t), through a sigmoid residual gate.
So every turn costs the same, however long the conversation: O(N*T) for N turns of T tokens, where a stateless LLM
that re-reads the history pays O(N^2*T).

Read top to bottom: config -> RoPE -> attention (the SQA family) -> feed-forward (SwiGLU, MoE) -> encoder and
decoder -> memory attention and its gate -> ReactiveTransformer -> the stateless baseline. Generation (the KV cache,
sampling, the fast single-token path) is in engine.py. Where this file departs from the reference implementation
(RxNN/RxLM), the comment says so and why.

References: RxT - A. Filipek, "Reactive Transformer (RxT) - Stateful Real-Time Processing for Event-Driven Reactive
Language Models", arXiv:2510.03561 (2025), and the RxT-Alpha model cards (the sizes of PRESETS). SQA - A. Filipek,
"Sparse Query Attention (SQA)", arXiv:2510.01817 (2025). RoPE: Su et al., arXiv:2104.09864. SwiGLU: Shazeer,
arXiv:2002.05202. RMSNorm: Zhang & Sennrich, arXiv:1910.07467. MoE balancing loss: Switch Transformers (Fedus et al.,
arXiv:2101.03961).

Notation in shape comments: B batch, T tokens, L layers, D model dim, H heads (only fixes the head size hd = D/H),
Hq query heads, Hkv key/value heads, S STM slots per layer, M length of what cross-attention reads (S slots or T
tokens), V vocab, E experts, k experts per token, N tokens of a flattened batch.
"""

from copy import deepcopy
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 7500
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 8  # only fixes the head size hd = d_model // n_heads
    n_q_heads: int = 4  # Sparse Query Attention: fewer query heads than n_heads
    n_kv_heads: int = 4
    enc_ff_dim: int = 384  # encoder dense SwiGLU hidden size
    n_experts: int = 12  # decoder MoE
    top_k: int = 2
    expert_dim: int = 256
    seq_len: int = 256  # longest single interaction
    stm_size: int = 256  # S, memory slots per layer
    memory_attention: str = "self-interlayer"  # simple | self | interlayer | self-interlayer
    gate_type: str = "linear"  # static | per-slot | per-element | linear | none (plain residual, for comparison)
    encoder_cross_attention: bool = False  # only the RxT-Alpha Mini *Base* encoder card has it
    enc_cross_q_heads: int = 8
    enc_cross_kv_heads: int = 4
    rope_base: float = 10000.0
    stm_init_std: float = 0.02
    # the memory system: the reference design by default; the alternatives are measured in the README
    memory_rope: bool = True  # RoPE on the read's queries and the write's token keys (False: no positions at all)
    memory_qk_norm: bool = False  # QK-norm in memory cross-attention and memory attention
    memory_heads: int = 0  # query = key/value heads of memory cross-attention and memory attention (0: n_q_heads)
    write_competition: bool = False  # the write's slots compete for tokens (softmax over slots; see Attention)
    stm_init: str = "noise"  # noise: a fresh STM is N(0, stm_init_std^2); learned: learned slots + that noise
    # what checkpoints converted from RxNN/RxLM need (convert_rxnn.py); the defaults are this file's own design
    ff_bias: bool = False  # biases in the encoder's SwiGLU (the reference's GatedFeedForward has them)
    expert_bias: bool = False  # per-expert biases in the decoder's MoE, each expert's weighted with its output
    moe_out_bias: bool = False  # one bias added once to the mixed MoE output (rxlm's vectorised experts)
    final_norm: str = "rms"  # before the LM head: rms (ours), none (the reference), layer (its use_head_norm)

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_q_heads", "n_kv_heads", "enc_ff_dim", "n_experts",
                 "top_k", "expert_dim", "seq_len", "stm_size")
        bad = [f for f in sizes if getattr(self, f) < 1] + ["memory_heads"] * (self.memory_heads < 0)
        for ok, message in [(not bad, f"{', '.join(bad)} must be positive"),
                            (self.d_model % max(1, self.n_heads) == 0, "d_model must be divisible by n_heads"),
                            (self.head_dim % 2 == 0, "RoPE needs an even head size d_model / n_heads"),
                            (self.n_q_heads % max(1, self.n_kv_heads) == 0, "n_q_heads must be a multiple of n_kv_heads"),
                            (self.top_k <= self.n_experts, "top_k must be at most n_experts"),
                            (self.memory_attention in MEMORY_ATTENTION, f"memory_attention: one of {MEMORY_ATTENTION}"),
                            (self.gate_type in GATES, f"gate_type must be one of {GATES}"),
                            (self.stm_init in ("noise", "learned"), "stm_init must be noise or learned"),
                            (self.final_norm in ("rms", "none", "layer"), "final_norm must be rms, none or layer"),
                            (self.d_model % 8 == 0 and self.expert_dim % 8 == 0, "d_model and expert_dim must be "
                             "multiples of 8 (the experts' grouped matmul needs aligned rows)")]:
            if not ok:
                raise ValueError(f"ModelConfig: {message}")

    @property
    def head_dim(self):
        return self.d_model // max(1, self.n_heads)


MEMORY_ATTENTION = ("simple", "self", "interlayer", "self-interlayer")
GATES = ("static", "per-slot", "per-element", "linear", "none")

# The RxT-Alpha cards' sizes (micro, mini) and the CPU demo (nano). Parameter counts are checked in tests.
PRESETS = {
    "nano": ModelConfig(vocab_size=2048, d_model=96, n_layers=4, n_heads=4, n_q_heads=2, n_kv_heads=2,
                        enc_ff_dim=256, n_experts=4, top_k=2, expert_dim=192, seq_len=128, stm_size=64,
                        memory_attention="interlayer", gate_type="per-slot"),
    "micro": ModelConfig(),
    # Mini: a linear gate would be a 1024x1024 matrix per gate, so per-slot gates
    "mini": ModelConfig(vocab_size=10000, d_model=256, n_layers=8, n_heads=16, n_q_heads=8, n_kv_heads=8,
                        enc_ff_dim=768, n_experts=16, top_k=2, expert_dim=512, seq_len=1024, stm_size=1024,
                        gate_type="per-slot", encoder_cross_attention=True),
}


def get_config(preset, **overrides):
    """A preset's ModelConfig with some fields replaced (unknown fields are an error)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
    return replace(PRESETS[preset], **overrides)


# -----------------------------------------------------------------------------
# RoPE: positions only where positions exist. Token sequences carry positions; the STM is a *set* of slots and never
# does. So: self-attention rotates queries and keys; the decoder's memory cross-attention (tokens -> STM) rotates only
# its queries; the memory write (STM -> ED tokens) rotates only the token keys; STM -> STM attention rotates nothing.


def rope(positions, head_dim, base):
    """cos and sign-folded sin (T, hd) of the rotation angles for integer positions (T,), as apply_rope wants them."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq  # (T, hd/2)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, hd) by position, half-split layout [x1, x2] -> [x1 cos - x2 sin, x1 sin + x2 cos], written
    as x * cos + [x2, x1] * [-sin, sin]: q.k then depends only on the offset."""
    return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, dims=-1) * sin.to(x.dtype)


# -----------------------------------------------------------------------------
# Attention: one class for the whole family, by its number of query heads Hq and key/value heads Hkv at head size
# hd = D / H. MHA: Hq = Hkv = H. GQA: Hkv < Hq = H (groups of query heads share a K/V head). MQA: Hkv = 1.
# Sparse Query Attention (SQA) instead cuts the *query* heads, Hq < H: the score matmuls (T x T per query head) then
# cost Hq/H of MHA's, which matters where a whole sequence is processed at once (training, prompts, the encoder).
# Symmetric SQA (sSQA) is Hq = Hkv = H/2, extreme SQA (xSQA) is Hq = Hkv <= H/4. RxT-Alpha uses sSQA everywhere.


class Attention(nn.Module):
    """The attention family by (H, Hq, Hkv): MHA, GQA, MQA and SQA - self-attention or cross-attention."""

    def __init__(self, d_model, n_heads, n_q_heads, n_kv_heads, qk_norm=False, compete=False):
        super().__init__()
        self.hd, self.n_q, self.n_kv, self.compete = d_model // n_heads, n_q_heads, n_kv_heads, compete
        # one matrix for queries, keys and values (rows [q | k | v]): self-attention projects them in one matmul
        self.qkv_proj = nn.Linear(d_model, (n_q_heads + 2 * n_kv_heads) * self.hd, bias=False)
        self.out_proj = nn.Linear(n_q_heads * self.hd, d_model, bias=True)
        # QK-norm: unit-RMS queries and keys per head, with learned gains - lets attention turn sharp early
        self.q_norm, self.k_norm = (nn.RMSNorm(self.hd), nn.RMSNorm(self.hd)) if qk_norm else (None, None)

    def heads(self, x, n, rope_cs=None, norm=None):  # (B, T, n*hd) -> (B, n, T, hd), normed, then rotated
        x = x.view(x.size(0), x.size(1), n, self.hd).transpose(1, 2)
        x = x if norm is None else norm(x)
        return x if rope_cs is None else apply_rope(x, *rope_cs)

    def keys_values(self, context, k_rope=None):
        """Keys and values (B, Hkv, M, hd) of what the queries read; cacheable (the STM's, once per turn)."""
        k, v = F.linear(context, self.qkv_proj.weight[self.n_q * self.hd:]).chunk(2, dim=-1)
        return self.heads(k, self.n_kv, k_rope, self.k_norm), self.heads(v, self.n_kv)

    def forward(self, x, context=None, *, context_kv=None, q_rope=None, k_rope=None, attn_mask=None, is_causal=False,
                cache=None):
        """x (B, T, D) makes the queries. They read `context` (B, M, D), or x itself when both context and
        context_kv are None (self-attention), or `context_kv`, its keys/values already projected. A `cache`
        (KVCache) first appends this step's keys/values and then serves all of them.
        attn_mask (B or 1, 1, T or 1, M) bool: True = may attend."""
        B, T, _ = x.shape
        if context is None and context_kv is None:
            q, k, v = self.qkv_proj(x).split([self.n_q * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
            context_kv = self.heads(k, self.n_kv, k_rope, self.k_norm), self.heads(v, self.n_kv)
        else:
            q = F.linear(x, self.qkv_proj.weight[:self.n_q * self.hd])
            context_kv = context_kv if context_kv is not None else self.keys_values(context, k_rope)
        q = self.heads(q, self.n_q, q_rope, self.q_norm)  # (B, Hq, T, hd)
        k, v = context_kv if cache is None else cache.append(*context_kv)  # (B, Hkv, M, hd)
        if self.compete:
            y = competitive_attention(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               enable_gqa=self.n_q != self.n_kv)  # (B, Hq, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_q * self.hd))


def competitive_attention(q, k, v, attn_mask=None):
    """Attention whose queries compete for the keys (as in Slot Attention): the softmax runs over the queries, so a
    token taken by one STM slot is not also averaged into every other slot; then each slot takes the weighted mean
    of its tokens. q (B, Hq, S, hd), k and v (B, Hkv, T, hd), attn_mask (B or 1, 1, 1, T) -> (B, Hq, S, hd)."""
    k, v = (x.repeat_interleave(q.size(1) // k.size(1), dim=1) for x in (k, v))  # GQA: each kv head serves a group
    a = (q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(dim=-2)  # (B, Hq, S, T): each token's mass over slots
    if attn_mask is not None:
        a = a * attn_mask
    return (a / (a.sum(dim=-1, keepdim=True) + 1e-6)) @ v  # per slot a weighted mean of the tokens it won


# -----------------------------------------------------------------------------
# Feed-forward: dense SwiGLU (encoder) and Mixture-of-Experts (decoder)


def glu(h):  # [Wg x | Wu x] -> silu(Wg x) * Wu x
    gate, up = h.split([h.size(-1) // 2] * 2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Dense gated feed-forward of the encoder: W2(silu(Wg x) * Wu x), with Wg and Wu in one matrix."""

    def __init__(self, d_model, hidden, bias=False):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.w_down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x):
        return self.w_down(glu(self.w_gate_up(x)))


class MoEFeedForward(nn.Module):
    """Decoder feed-forward: a softmax router sends each token to its top-k SwiGLU experts (no capacity limit, no
    dropped tokens); also returns its routing statistics over the real tokens, from which balancing_loss() computes
    the Switch load-balancing loss."""

    def __init__(self, d_model, n_experts, top_k, hidden, expert_bias=False, out_bias=False):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # experts stacked as (E, ...) tensors: expert e is SwiGLU(w_gate_up[e] = [Wg | Wu], w_down[e])
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        # no biases in this file's design; checkpoints converted from RxNN/RxLM have them: per expert, or one added
        # after the experts are mixed
        self.b_gate_up = nn.Parameter(torch.zeros(n_experts, 2 * hidden)) if expert_bias else None
        self.b_down = nn.Parameter(torch.zeros(n_experts, d_model)) if expert_bias else None
        self.out_bias = nn.Parameter(torch.zeros(d_model)) if out_bias else None

    def expert(self, e, x, w1, w2):
        """Expert e on its tokens x (n, D) -> (n, D), with its biases if it has them (its output bias is then weighted
        by the router like the rest of its output)."""
        if self.b_gate_up is None:
            return glu(x @ w1[e]) @ w2[e]
        return torch.addmm(self.b_down[e], glu(torch.addmm(self.b_gate_up[e], x, w1[e])), w2[e])

    def forward(self, x, token_mask=None):  # (B, T, D), (B, T) bool -> (B, T, D), routing statistics (2, E)
        shape, D = x.shape, x.size(-1)
        x = x.reshape(-1, D)  # (N, D)
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalise the k chosen
        experts = experts.flatten()  # (N*k,) routing slots, k per token
        counts = torch.bincount(experts, minlength=self.n_experts)  # (E,)
        # sums over the real tokens (padding is routed, but not counted): chunks of a batch add them up
        real = probs.new_ones(len(x)) if token_mask is None else token_mask.reshape(-1).to(probs.dtype)  # (N,)
        stats = torch.stack([torch.bincount(experts, real.repeat_interleave(self.top_k), self.n_experts),
                             (probs * real[:, None]).sum(dim=0)])  # (2, E): routing slots, router probability mass
        # dispatch with no loop and no host sync: sort the slots by expert, gather their tokens once, run every
        # expert on its contiguous group in one grouped matmul, scatter-add the weighted outputs back to the tokens
        order = experts.argsort()  # (N*k,)
        token_of_slot = order // self.top_k
        ends = counts.cumsum(0).to(torch.int32)  # where each expert's group ends
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x.index_select(0, token_of_slot).to(dtype)  # (N*k, D), grouped by expert
        if dtype == torch.bfloat16:  # one grouped matmul for all experts: no loop, no host sync (GPU kernels: bf16)
            h = F.grouped_mm(xs, self.w_gate_up.to(dtype), offs=ends)  # (N*k, 2H)
            if self.b_gate_up is not None:  # expert biases (converted checkpoints): each slot gets its expert's
                h = h + self.b_gate_up[experts[order]].to(dtype)
            ys = F.grouped_mm(glu(h), self.w_down.to(dtype), offs=ends)  # (N*k, D)
            if self.b_down is not None:
                ys = ys + self.b_down[experts[order]].to(dtype)
        else:  # fp32: one matmul per used expert (on a CPU the host sync of tolist() costs nothing); unbound once,
            # so that backward stacks the experts' grads into one tensor instead of one (E, ...) tensor per expert
            w1, w2 = (w.unbind() if torch.is_grad_enabled() else w for w in (self.w_gate_up, self.w_down))
            ys = torch.cat([self.expert(e, part, w1, w2) for e, part in enumerate(xs.split(counts.tolist()))
                            if len(part)])
        ys = (ys * weights.flatten()[order, None].to(ys.dtype)).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, ys)  # (N, D)
        return (out if self.out_bias is None else out + self.out_bias).view(shape), stats


def balancing_loss(stats):
    """The Switch load-balancing loss E * sum_e f_e * P_e, averaged over layers, from routing statistics (L, 2, E)
    summed over the real tokens: f_e = share of the routing slots sent to expert e, P_e = mean router probability
    of e (the probabilities sum to 1 per token, so their total mass is the token count). It is 1 when routing is
    uniform. A product of two means, so it is computed once the statistics of a whole batch are summed. (The
    reference averages P_e over routed tokens only.)"""
    slots, mass = stats.float().unbind(dim=-2)  # (L, E) each
    f = slots / slots.sum(dim=-1, keepdim=True).clamp(min=1)
    p = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-9)
    return slots.size(-1) * (f * p).sum(dim=-1).mean()


# -----------------------------------------------------------------------------
# Encoder and decoder (pre-norm, RMSNorm)


class EncoderLayer(nn.Module):
    """Memory-encoder layer: bidirectional self-attention + dense SwiGLU (+ STM cross-attention on the Mini-Base card)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.norm1 = nn.RMSNorm(D)
        self.attn = Attention(D, cfg.n_heads, cfg.n_q_heads, cfg.n_kv_heads)
        self.cross_attn = None
        if cfg.encoder_cross_attention:
            self.norm_cross, self.stm_norm = nn.RMSNorm(D), nn.RMSNorm(D)
            self.cross_attn = Attention(D, cfg.n_heads, cfg.enc_cross_q_heads, cfg.enc_cross_kv_heads)
        self.norm2, self.ff = nn.RMSNorm(D), SwiGLU(D, cfg.enc_ff_dim, bias=cfg.ff_bias)

    def forward(self, x, rope_cs, attn_mask=None, stm_l=None):
        x = x + self.attn(self.norm1(x), q_rope=rope_cs, k_rope=rope_cs, attn_mask=attn_mask)
        if self.cross_attn is not None and stm_l is not None:  # the STM is a set: its keys carry no position
            x = x + self.cross_attn(self.norm_cross(x), self.stm_norm(stm_l), q_rope=rope_cs)
        return x + self.ff(self.norm2(x))


class Encoder(nn.Module):
    """Memory encoder: turns a whole interaction into encoded data ED = every layer's hidden states."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, x, attn_mask=None, stm=None):
        # x (B, T, D) embeddings; attn_mask (B, T) bool, True = real token; stm (L, B, S, D) or None -> ED (L, B, T, D)
        rope_cs = rope(torch.arange(x.size(1), device=x.device), self.cfg.head_dim, self.cfg.rope_base)
        key_mask = None if attn_mask is None else attn_mask[:, None, None, :]  # (B, 1, 1, T): padding is never read
        ed = []
        for l, layer in enumerate(self.layers):
            x = layer(x, rope_cs, key_mask, None if stm is None else stm[l])
            ed.append(x)
        return torch.stack(ed)


class DecoderLayer(nn.Module):
    """Generator-decoder layer: causal self-attention -> memory cross-attention to the STM -> MoE."""

    def __init__(self, cfg, memory_cross_attention=True):
        super().__init__()
        D = cfg.d_model
        self.norm1 = nn.RMSNorm(D)
        self.self_attn = Attention(D, cfg.n_heads, cfg.n_q_heads, cfg.n_kv_heads)
        self.cross_attn, self.memory_rope = None, cfg.memory_rope
        if memory_cross_attention:
            self.norm2, self.stm_norm = nn.RMSNorm(D), nn.RMSNorm(D)
            self.cross_attn = memory_attention_heads(cfg)
        self.norm3 = nn.RMSNorm(D)
        self.moe = MoEFeedForward(D, cfg.n_experts, cfg.top_k, cfg.expert_dim, cfg.expert_bias, cfg.moe_out_bias)

    def forward(self, x, rope_cs, memory_kv=None, memory_mask=None, self_mask=None, is_causal=True, cache=None,
                token_mask=None):
        x = x + self.self_attn(self.norm1(x), q_rope=rope_cs, k_rope=rope_cs, attn_mask=self_mask,
                               is_causal=is_causal, cache=cache)
        if self.cross_attn is not None:  # queries carry positions, memory keys do not (the STM is a set)
            x = x + self.cross_attn(self.norm2(x), context_kv=memory_kv, q_rope=rope_cs if self.memory_rope else None,
                                    attn_mask=memory_mask)
        h, routing = self.moe(self.norm3(x), token_mask)
        return x + h, routing


class Decoder(nn.Module):
    """The generator: (shared) embeddings in, decoder layers reading memory, final norm, untied LM head."""

    def __init__(self, cfg, memory_cross_attention=True):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, memory_cross_attention) for _ in range(cfg.n_layers))
        # deviation: the reference has no final norm (or a LayerNorm with use_head_norm); an RMSNorm stabilises
        # training. cfg.final_norm keeps the reference's choice for converted checkpoints
        D = cfg.d_model
        self.norm = nn.RMSNorm(D) if cfg.final_norm == "rms" else nn.LayerNorm(D) if cfg.final_norm == "layer" \
            else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def project_memory(self, memory):
        """Per-layer K/V of the memory (L, B, M, D), computed once per turn and reused for every generated token."""
        if self.layers[0].cross_attn is None:
            return [None] * len(self.layers)
        return [layer.cross_attn.keys_values(layer.stm_norm(memory[l])) for l, layer in enumerate(self.layers)]

    def forward(self, x, memory_kv=None, memory_mask=None, rope_cs=None, self_mask=None, caches=None,
                logits_at=None, token_mask=None):
        # x (B, T, D); memory_kv from project_memory(); memory_mask (B, M) bool; rope_cs (cos, sin) of the positions,
        # (T, hd) or (B, 1, T, hd), default 0..T-1; logits_at (B,): logits (B, 1, V) only there (a prompt's last token);
        # token_mask (B, T): the real tokens, which the MoE routing statistics (L, 2, E) count
        B, T, _ = x.shape
        if rope_cs is None:
            rope_cs = rope(torch.arange(T, device=x.device), self.cfg.head_dim, self.cfg.rope_base)
        # a prompt into an empty cache is plain causal; one new token attends every cached key
        is_causal = self_mask is None and T > 1
        assert not (is_causal and caches is not None and caches[0].len > 0), "multi-token step on a filled cache"
        memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        memory_kv = memory_kv or [None] * len(self.layers)
        routing = []
        for l, layer in enumerate(self.layers):
            x, r = layer(x, rope_cs, memory_kv[l], memory_mask, self_mask, is_causal,
                         None if caches is None else caches[l], token_mask)
            routing.append(r)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, D)
        return self.lm_head(self.norm(x)), torch.stack(routing)


def token_loss(logits, targets):
    """Mean cross-entropy over the targets that count. logits (B, T, V); targets (B, T): targets[:, t] is the token
    logits[:, t] should predict, -100 where nothing counts (padding, the query of an interaction)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def token_accuracy(logits, targets):
    """Share of the counted targets that the argmax of the logits gets right."""
    counted = targets != -100
    return (logits.argmax(dim=-1) == targets)[counted].float().mean()


def token_logprobs(logits, ids):
    """Log-prob of each next token of ids under logits (B, T, V), and the entropy of each prediction, both (B, T-1):
    the policy of the MRL phase."""
    logp_all = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(dim=-1)


class MLMHead(nn.Module):
    """Masked-language-model head of the encoder (training only): Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h):
        return self.out(self.norm(F.gelu(self.dense(h))))


class Critic(nn.Module):
    """The value function V(s) of the MRL phase (training only): an encoder copy reads the query, a head adds memory."""

    def __init__(self, model):
        super().__init__()
        D = model.cfg.d_model
        self.embed, self.encoder = deepcopy(model.embed), deepcopy(model.encoder)
        self.head = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, 1))

    def forward(self, ids, attn_mask, stm):  # (B, T), (B, T), (L, B, S, D) -> (B,)
        h = self.encoder(self.embed(ids), attn_mask)[-1]
        pooled = (h * attn_mask[..., None]).sum(dim=1) / attn_mask.sum(dim=1, keepdim=True)
        return self.head(torch.cat([pooled, stm.mean(dim=(0, 2))], dim=-1)).squeeze(-1)


# -----------------------------------------------------------------------------
# Memory attention: the write path into the Short-Term Memory. The STM (L, B, S, D) holds S slots per layer; it is
# state, passed around like an RNN's hidden state. A write is attention with the old slots as queries and the encoded
# interaction as keys/values, followed by a gated residual. Without the gate (STM + Update) the memory's norm grows
# turn after turn; the sigmoid gate makes every write a convex mix, so it stays bounded.


def memory_attention_heads(cfg, compete=False):
    """The attention that reads or writes the STM (decoder memory cross-attention, memory attention)."""
    h = cfg.memory_heads
    return Attention(cfg.d_model, cfg.n_heads, h or cfg.n_q_heads, h or cfg.n_kv_heads, qk_norm=cfg.memory_qk_norm,
                     compete=compete)


class ResidualGate(nn.Module):
    """Sigmoid gate of a memory write: STM_t = (1 - G) * STM_{t-1} + G * Update; G per slot (B, S, 1) or per
    element (B, S, D)."""

    def __init__(self, kind, n_slots, d_model):
        super().__init__()
        self.kind = kind
        if kind == "static":  # G = sigmoid(w), a learned constant per slot
            self.w = nn.Parameter(torch.full((n_slots, 1), -1.0))  # sigmoid(-1) ~ 0.27 at init
        elif kind == "per-slot":  # G = sigmoid(w * mean_D(STM + Update) + b), w and b per slot
            self.w = nn.Parameter(torch.ones(n_slots))
            self.b = nn.Parameter(torch.full((n_slots,), -1.0))
        elif kind == "linear":  # G = sigmoid(Linear(S, S)(mean_D(STM + Update))): mixes evidence across slots (Micro)
            self.lin = nn.Linear(n_slots, n_slots)
        elif kind == "per-element":  # G = sigmoid(W (STM + Update) + b), W (D, D): the content decides (the paper's)
            self.lin = nn.Linear(d_model, d_model)
        # the content gates' bias starts at 0 (init_weights), so a first write moves the STM halfway, G ~ 0.5.
        # Starting them small like the two above, at sigmoid(-1), cost the demo 4.5-7.5 points of recall after SMAT at
        # every distance (same SFT checkpoint, only the bias changed; README "What the demo gets")

    def forward(self, stm, update):  # (B, S, D) each
        if self.kind == "none":  # plain residual: norms grow turn after turn (kept to show why the gate exists)
            return stm + update
        if self.kind == "static":
            g = torch.sigmoid(self.w)  # (S, 1)
        elif self.kind == "per-element":
            g = torch.sigmoid(self.lin(stm + update))  # (B, S, D)
        else:
            m = (stm + update).mean(dim=-1)  # (B, S)
            g = torch.sigmoid(self.w * m + self.b if self.kind == "per-slot" else self.lin(m))[..., None]  # (B, S, 1)
        return (1 - g) * stm + g * update


class MemoryAttentionLayer(nn.Module):
    """Writes one layer of encoded data into one STM layer, after an optional STM -> STM step (the variants):
    simple (none), self (the layer's slots attend to themselves), interlayer (to the mean of all layers' slots),
    self-interlayer (to a learned per-slot mix of both)."""

    def __init__(self, cfg):
        super().__init__()
        D, S = cfg.d_model, cfg.stm_size
        self.variant = cfg.memory_attention
        if self.variant != "simple":  # STM -> STM first: no positions anywhere
            self.pre_norm_q, self.pre_norm_kv = nn.RMSNorm(D), nn.RMSNorm(D)
            self.pre_attn = memory_attention_heads(cfg)
            self.pre_gate = ResidualGate(cfg.gate_type, S, D)
            if self.variant == "self-interlayer":
                self.mix = nn.Parameter(torch.zeros(S, 1))  # sigmoid(0) = 0.5: half own layer, half the mean
        self.norm_stm, self.norm_ed = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attn = memory_attention_heads(cfg, compete=cfg.write_competition)
        self.gate = ResidualGate(cfg.gate_type, S, D)

    def forward(self, stm_l, stm_mean, ed_l, ed_rope, ed_mask):
        # stm_l, stm_mean (B, S, D); ed_l (B, T, D); ed_mask (B, 1, 1, T) or None
        if self.variant != "simple":
            if self.variant == "self":
                context = self.pre_norm_kv(stm_l)
            elif self.variant == "interlayer":
                context = self.pre_norm_kv(stm_mean)
            else:
                m = torch.sigmoid(self.mix)
                context = m * self.pre_norm_kv(stm_l) + (1 - m) * self.pre_norm_kv(stm_mean)
            stm_l = self.pre_gate(stm_l, self.pre_attn(self.pre_norm_q(stm_l), context))
        # main step: slots query the interaction's tokens; only the token keys carry positions
        update = self.attn(self.norm_stm(stm_l), self.norm_ed(ed_l), k_rope=ed_rope, attn_mask=ed_mask)
        return self.gate(stm_l, update)


class MemoryAttention(nn.Module):
    """The memory write path, layer by layer: STM_t = MemAttn(STM_{t-1}, ED_t)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MemoryAttentionLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, stm, ed, ed_mask=None):  # stm (L, B, S, D), ed (L, B, T, D), ed_mask (B, T) -> (L, B, S, D)
        ed_rope = rope(torch.arange(ed.size(2), device=ed.device), self.cfg.head_dim, self.cfg.rope_base) \
            if self.cfg.memory_rope else None
        key_mask = None if ed_mask is None else ed_mask[:, None, None, :]
        stm_mean = stm.mean(dim=0)  # (B, S, D): what the inter-layer variants attend to
        return torch.stack([layer(stm[l], stm_mean, ed[l], ed_rope, key_mask) for l, layer in enumerate(self.layers)])


# -----------------------------------------------------------------------------
# Batches of rows of different lengths. A right-padded batch computes its padding too, and the world's turns run from
# 8 to 110 tokens: in a batch of them most positions can be padding. So the model's batch methods (mlm, decode,
# update_memory) take `chunks`: groups of rows of similar length, each with its longest length n, [(rows, n), ...]
# (data.loaders.length_chunks makes them). Each group runs cut to its n tokens. Rows never see each other, so every
# output is the padded batch's; the losses are divided by the whole batch's counts and the MoE routing statistics
# summed over the groups, so the losses and gradients are the padded batch's too (tests/test_chunks.py).


def take(x, rows, dim=0):
    """The chunk's rows of x along dim (all of x when rows is None)."""
    return x if rows is None or x is None else x.index_select(dim, rows)


def unchunk(parts, chunks, dim=0, length=None):
    """The chunks' outputs back in the batch's row order along dim: each part padded with zeros along dim + 1 to
    `length` first (None: the parts are equally long)."""
    if chunks is None:
        return parts[0]
    if length is not None:
        parts = [F.pad(p, (0, 0) * (p.dim() - dim - 2) + (0, length - p.size(dim + 1))) for p in parts]
    order = torch.cat([rows for rows, _ in chunks]).argsort()
    return torch.cat(parts, dim=dim).index_select(dim, order)


# -----------------------------------------------------------------------------
# The Reactive Transformer


def init_weights(module):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, MoEFeedForward):
            for w in (m.w_gate_up, m.w_down):
                nn.init.normal_(w, std=0.02)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


class ReactiveTransformer(nn.Module):
    """RxT: a decoder that answers reading the STM, an encoder + memory attention that write each interaction into it.
    The STM (L, B, S, D) is explicit state, passed around like an RNN hidden state:
        stm = model.new_memory(1)
        for tok in engine.interact(model, query_ids, stm, eos_id=eos): ...  # answer, reading STM_{t-1}
        stm = model.update_memory(stm, interaction_ids)                   # write the turn: STM_t
    Losses live here too, as in nanoGPT: decode(..., targets) and mlm(...) return them (targets: -100 = ignored)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder, decoder (and so the memory space)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.memory_attention = MemoryAttention(cfg)
        self.mlm_head = MLMHead(cfg)
        init_weights(self)
        # learned initial slots give every slot an identity that the write can specialise (a deviation; see README)
        self.stm_init = nn.Parameter(0.02 * torch.randn(cfg.n_layers, cfg.stm_size, cfg.d_model)) \
            if cfg.stm_init == "learned" else None

    def new_memory(self, batch_size, generator=None, std=None):
        """A fresh STM (L, B, S, D): Gaussian noise of std (default stm_init_std), around the learned slots if any."""
        c = self.cfg
        device = self.embed.weight.device if generator is None else generator.device
        stm = torch.randn(c.n_layers, batch_size, c.stm_size, c.d_model, generator=generator, device=device)
        stm = (stm * (c.stm_init_std if std is None else std)).to(self.embed.weight.device)
        return stm if self.stm_init is None else stm + self.stm_init[:, None]

    def encode(self, ids, attn_mask=None, stm=None):
        """Encoded data ED (L, B, T, D) of a full interaction (stm: only for the Mini-Base encoder's cross-attention)."""
        return self.encoder(self.embed(ids), attn_mask, stm if self.cfg.encoder_cross_attention else None)

    def mlm(self, masked_ids, attn_mask, targets, chunks=None):
        """Masked language modelling: ED of the masked ids, and the MLM head's cross-entropy and accuracy on the
        positions whose target is not -100 (the masked ones). chunks: see "Batches of rows of different lengths"."""
        eds, ce, right = [], 0.0, 0
        for rows, n in chunks or [(None, masked_ids.size(1))]:
            ed = self.encode(take(masked_ids, rows)[:, :n], take(attn_mask, rows)[:, :n])
            t = take(targets, rows)[:, :n]
            chosen = t != -100  # (b, n)
            logits = self.mlm_head(ed[-1][chosen])  # (n_masked, V): the head only where it is scored
            ce = ce + F.cross_entropy(logits.float(), t[chosen], reduction="sum")
            right = right + (logits.argmax(dim=-1) == t[chosen]).sum()
            eds.append(ed)
        n_masked = (targets != -100).sum().clamp(min=1)
        return unchunk(eds, chunks, dim=1, length=masked_ids.size(1)), ce / n_masked, right / n_masked

    def decode(self, ids, memory, memory_mask=None, targets=None, attn_mask=None, chunks=None, keep_logits=True):
        """Next-token logits (B, T, V) reading memory (L, B, M, D) - the STM, or in joint pre-training the encoder's
        ED with its padding mask (B, M). Returns logits, the cross-entropy on targets (None without them) and the
        MoE balancing loss over the real tokens (attn_mask (B, T); every token counts without it).
        chunks: see "Batches of rows of different lengths"; the logits are then 0 on the padding no chunk computed,
        and put back in the batch's shape only if keep_logits (else None: a loss alone needs no copy of them)."""
        logits, ce, routing = [], 0.0, 0.0
        for rows, n in chunks or [(None, ids.size(1))]:
            mem, mem_mask = take(memory, rows, dim=1), take(memory_mask, rows)
            if rows is not None and mem_mask is not None:  # the ED read in joint training: cut to its longest row
                m = int(mem_mask.sum(dim=1).max())
                mem, mem_mask = mem[:, :, :m], mem_mask[:, :m]
            lg, r = self.decoder(self.embed(take(ids, rows)[:, :n]), self.decoder.project_memory(mem), mem_mask,
                                 token_mask=None if attn_mask is None else take(attn_mask, rows)[:, :n])
            if targets is not None:
                ce = ce + F.cross_entropy(lg.flatten(0, 1).float(), take(targets, rows)[:, :n].flatten(),
                                          ignore_index=-100, reduction="sum")
            logits.append(lg)
            routing = routing + r
        loss = None if targets is None else ce / (targets != -100).sum().clamp(min=1)
        logits = unchunk(logits, chunks, dim=0, length=ids.size(1)) if keep_logits or chunks is None else None
        return logits, loss, balancing_loss(routing)

    def update_memory(self, stm, ids, attn_mask=None, chunks=None):
        """STM_t = MemAttn(STM_{t-1}, ED_t) for the full interaction `[BOS][Q] query [A] answer [EOS]`.
        chunks: see "Batches of rows of different lengths"."""
        new = []
        for rows, n in chunks or [(None, ids.size(1))]:
            old, mask = take(stm, rows, dim=1), None if attn_mask is None else take(attn_mask, rows)[:, :n]
            new.append(self.memory_attention(old, self.encode(take(ids, rows)[:, :n], mask, old), mask))
        return unchunk(new, chunks, dim=1)

    def compile(self, **kwargs):
        """torch.compile the parts training calls, in place (state_dict keys stay clean: no _orig_mod. prefix)."""
        for part in (self.encoder, self.decoder, self.memory_attention):
            part.compile(**kwargs)

    def param_counts(self):
        """Sizes per component, counted like the model cards: the shared embedding in encoder and decoder."""
        c, emb = self.cfg, count_params(self.embed)
        dec = emb + count_params(self.decoder)
        expert = 3 * c.d_model * c.expert_dim + (2 * c.expert_dim + c.d_model) * c.expert_bias
        return {"encoder": emb + count_params(self.encoder), "decoder": dec,
                "decoder_active": dec - c.n_layers * (c.n_experts - c.top_k) * expert,
                "memory_attention": count_params(self.memory_attention), "mlm_head": count_params(self.mlm_head),
                "total": count_params(self)}


# -----------------------------------------------------------------------------
# The stateless baseline


class StatelessDecoder(nn.Module):
    """Baseline: the same decoder without memory cross-attention - a plain decoder-only LLM that must re-read the
    whole conversation every turn."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.decoder = Decoder(cfg, memory_cross_attention=False)
        init_weights(self)

    def forward(self, ids, targets=None):
        logits, routing = self.decoder(self.embed(ids))
        return logits, None if targets is None else token_loss(logits, targets), balancing_loss(routing)

    def compile(self, **kwargs):
        self.decoder.compile(**kwargs)
