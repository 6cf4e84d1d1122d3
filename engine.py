"""
Generation: the self-attention KV cache, sampling, and answers streamed token by token.

The prompt goes through the decoder's ordinary forward pass once, filling the cache. Every later token takes the
short path below (FastStep) when all rows of the batch share a position (chat, benchmarks): what is fixed for the
turn is prepared once - the memory's keys and values, the weights transposed with the RMSNorm gains folded in, the
RoPE rotation of every position as one matrix for queries and keys together (with the attention scale folded in),
views of the cache for every position - so that a token costs a dozen matmuls per layer and little else. Right-padded
batches (MRL rollouts, evaluation) take the ordinary forward pass for every token, with a key mask.
"""

import math

import torch
import torch.nn.functional as F

from model import glu, rope


class KVCache:
    """Self-attention keys/values of the current interaction only, preallocated: kv (2, B, Hkv, max_len, hd)."""

    def __init__(self, max_len):
        self.max_len, self.len, self.kv = max_len, 0, None

    def append(self, k, v):  # (B, Hkv, T, hd) each -> the keys and values of everything so far
        if self.kv is None:  # in the dtype the step produced (bf16 under autocast)
            self.kv = k.new_empty(2, k.size(0), k.size(1), self.max_len, k.size(3))
        T = k.size(2)
        assert self.len + T <= self.max_len, "KV cache overflow"
        self.kv[0, :, :, self.len:self.len + T] = k
        self.kv[1, :, :, self.len:self.len + T] = v
        self.len += T
        return self.kv[0, :, :, :self.len], self.kv[1, :, :, :self.len]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Sample (B,) tokens from (B, V) logits; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = F.softmax(sorted_logits, dim=-1)
        drop = p.cumsum(dim=-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def rotations(positions, n_heads, cfg, scale):
    """(P, n*hd, n*hd) block-diagonal matrices that apply RoPE (the model's half-split layout) to n heads at once."""
    cos, sin = rope(positions, cfg.head_dim, cfg.rope_base)  # (P, hd) each; sin sign-folded
    hd, half, i = cfg.head_dim, cfg.head_dim // 2, torch.arange(cfg.head_dim, device=positions.device)
    r = torch.zeros(len(positions), hd, hd, device=positions.device)
    r[:, i, i] = cos  # x * cos ...
    r[:, (i + half) % hd, i] = sin  # ... + roll(x) * sin
    return torch.stack([torch.block_diag(*[m] * n_heads) for m in r]) * scale


class FastStep:
    """One token per call, B rows at the same position: the decoder's layers as a flat sequence of 2-D matmuls,
    against everything prepared once for the turn. Same result as Decoder.forward (a test checks it)."""

    def __init__(self, decoder, memory_kv, caches, start, max_new_tokens):
        cfg, hd = decoder.cfg, decoder.cfg.head_dim
        positions = torch.arange(start, start + max_new_tokens, device=decoder.lm_head.weight.device)
        gain = lambda norm: norm.weight[:, None] * math.sqrt(cfg.d_model)  # x / |x| * gain = RMSNorm(x)
        self.layers = []
        for layer, cache, mem in zip(decoder.layers, caches, memory_kv or [None] * len(caches)):
            sa, ca, moe, B = layer.self_attn, layer.cross_attn, layer.moe, cache.kv.size(1)
            k, v = cache.kv.view(2, B * sa.n_kv, cache.max_len, hd)  # views of the cache
            L = dict(qkv=gain(layer.norm1) * sa.qkv_proj.weight.t(), nq=sa.n_q * hd, heads=B * sa.n_q,
                     out=sa.out_proj.weight.t(), out_b=sa.out_proj.bias,
                     write=[cache.kv[:, :, :, p].transpose(0, 1) for p in positions.tolist()],  # (B, 2, Hkv, hd)
                     read=[(k[:, :p + 1].transpose(1, 2), v[:, :p + 1]) for p in positions.tolist()],
                     router=gain(layer.norm3) * moe.router.weight.t(), g3=gain(layer.norm3)[:, 0], k=moe.top_k,
                     w1=moe.w_gate_up, w2=moe.w_down)
            if ca is not None:  # the memory's K/V are fixed for the turn; the read's queries are scaled up front
                cq = gain(layer.norm2) * ca.qkv_proj.weight[:ca.n_q * hd].t()
                L.update(c_out=ca.out_proj.weight.t(), c_out_b=ca.out_proj.bias, c_heads=B * ca.n_q, c_norm=ca.q_norm,
                         mk=mem[0].repeat_interleave(ca.n_q // ca.n_kv, 1).flatten(0, 1).transpose(1, 2),
                         mv=mem[1].repeat_interleave(ca.n_q // ca.n_kv, 1).flatten(0, 1),
                         cq=cq if cfg.memory_rope or ca.q_norm is not None else cq / math.sqrt(hd),
                         c_rot=list(rotations(positions, ca.n_q, cfg, 1 / math.sqrt(hd))) if cfg.memory_rope else None)
            self.layers.append(L)
        sa = decoder.layers[0].self_attn  # one matrix rotates (and scales) q and k and leaves v: [q | k | v] @ R
        scale = torch.cat([torch.full((sa.n_q * hd,), 1 / math.sqrt(hd)), torch.ones(sa.n_kv * hd)])
        rot = rotations(positions, sa.n_q + sa.n_kv, cfg, scale.to(positions.device))
        self.rot = list(torch.block_diag(*[m, torch.eye(sa.n_kv * hd, device=m.device)]) for m in rot)
        self.head, self.head_b, self.g = decoder.lm_head.weight.t(), decoder.lm_head.bias, gain(decoder.norm)[:, 0]
        self.hd, self.start, self.gqa = hd, start, sa.n_q // sa.n_kv

    def __call__(self, x, pos):  # x (B, D) the new token's embedding at position pos -> logits (B, V)
        i, hd, B = pos - self.start, self.hd, x.size(0)
        for L in self.layers:
            qkv = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) @ L["qkv"] @ self.rot[i]  # norm, project, RoPE
            L["write"][i].copy_(qkv[:, L["nq"]:].view(B, 2, -1, hd))  # this position's key and value
            keys, values = L["read"][i]
            q = qkv[:, :L["nq"]].reshape(L["heads"], 1, hd)
            if self.gqa > 1:  # grouped K/V: each key/value head serves gqa query heads
                keys, values = (t.repeat_interleave(self.gqa, 0) for t in (keys, values))
            y = torch.bmm(torch.softmax(torch.bmm(q, keys), dim=-1), values)  # (B*Hq, 1, hd)
            x = x + torch.addmm(L["out_b"], y.view(B, -1), L["out"])
            if "cq" in L:  # memory cross-attention: queries normed (QK-norm), rotated (memory_rope), scaled
                q = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) @ L["cq"]
                if L["c_norm"] is not None:
                    q = L["c_norm"](q.view(L["c_heads"], hd)).view(B, -1) / math.sqrt(hd) ** (L["c_rot"] is None)
                q = (q if L["c_rot"] is None else q @ L["c_rot"][i]).view(L["c_heads"], 1, hd)
                y = torch.bmm(torch.softmax(torch.bmm(q, L["mk"]), dim=-1), L["mv"])  # over the memory slots
                x = x + torch.addmm(L["c_out_b"], y.view(B, -1), L["c_out"])
            h = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            p, e = torch.softmax(h @ L["router"], dim=-1).topk(L["k"], dim=-1)  # (B, k) each
            hs = (h * L["g3"]).unsqueeze(1).expand(B, L["k"], -1).reshape(-1, 1, h.size(-1))  # (B*k, 1, D)
            e = e.view(-1)
            y = torch.bmm(glu(torch.bmm(hs, L["w1"].index_select(0, e))), L["w2"].index_select(0, e))  # chosen experts
            x = x + ((p / p.sum(dim=-1, keepdim=True)).unsqueeze(-1) * y.view(B, L["k"], -1)).sum(dim=1)
        return torch.addmm(self.head_b, x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.g, self.head)


@torch.no_grad()
def stream(decoder, embed, ids, attn_mask=None, memory_kv=None, *, max_new_tokens=64, temperature=1.0, top_k=None,
           top_p=None, eos_id=None, generator=None):
    """Yield the next token (B,) per step for right-padded prompts ids (B, T), attn_mask (B, T), until every row has
    said eos_id: the prompt through decoder.forward, then one token per step (FastStep when no row is padded)."""
    B, T = ids.shape
    caches = [KVCache(T + max_new_tokens) for _ in decoder.layers]
    cos, sin = rope(torch.arange(T + max_new_tokens, device=ids.device), decoder.cfg.head_dim, decoder.cfg.rope_base)
    lengths = torch.full((B,), T, device=ids.device) if attn_mask is None else attn_mask.sum(dim=1)
    self_mask = None  # no padding: plain causal prompt, then every cached key
    if attn_mask is not None:  # right padding: pads stay in the cache, masked out
        key_valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=ids.device)
        key_valid[:, :T] = attn_mask
        self_mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril() & attn_mask[:, None, None, :]
    logits, _ = decoder(embed(ids), memory_kv, rope_cs=(cos[:T], sin[:T]), self_mask=self_mask, caches=caches,
                        logits_at=lengths - 1)
    logits = logits[:, -1]
    fast = FastStep(decoder, memory_kv, caches, T, max_new_tokens) if attn_mask is None else None
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        yield tok
        done |= tok == eos_id if eos_id is not None else False
        if done.all() or step == max_new_tokens - 1:
            return
        if fast is not None:
            logits = fast(embed(tok), T + step)
        else:  # each row at its own position (right padding); keys up to this step's slot in the cache
            pos = lengths + step
            logits, _ = decoder(embed(tok[:, None]), memory_kv, rope_cs=(cos[pos][:, None, None], sin[pos][:, None, None]),
                                self_mask=key_valid[:, None, None, :T + step + 1], caches=caches)
            logits = logits[:, -1]


@torch.no_grad()
def generate(decoder, embed, ids, attn_mask=None, memory_kv=None, eos_id=None, **sampling):
    """Run stream to the end: tokens (B, N) and each row's length up to and including its first [EOS]."""
    tokens = torch.stack(list(stream(decoder, embed, ids, attn_mask, memory_kv, eos_id=eos_id, **sampling)), dim=1)
    lengths = torch.full((ids.size(0),), tokens.size(1), device=ids.device)
    if eos_id is not None:
        is_eos = tokens == eos_id
        lengths = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, lengths)
    return tokens, lengths
