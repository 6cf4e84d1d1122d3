"""
Generation: the self-attention KV cache, sampling, and answers streamed token by token.

The prompt goes through the decoder's ordinary forward pass once, filling the cache. Every later token takes the
short path below (FastStep) when all rows of the batch share a position (chat, benchmarks): what is fixed for the
turn is prepared once - the memory's keys and values, the weights transposed with the RMSNorm gains folded in, the
RoPE rotation of every position as one matrix for queries and keys together (with the attention scale folded in),
views of the cache for every position - so that a token costs a dozen matmuls per layer and little else. Right-padded
batches (MRL rollouts, evaluation) take the ordinary forward pass for every token, with a key mask.
"""

import contextlib
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


def rotations(positions, n_rot, n_plain, cfg, scale):
    """(P, N, N) matrices, N = (n_rot + n_plain) * hd: RoPE at each position (the model's half-split layout) on the
    first n_rot heads, the last n_plain heads left as they are, every column then multiplied by scale (N,)."""
    hd, n = cfg.head_dim, n_rot + n_plain
    cos, sin = rope(positions, hd, cfg.rope_base)  # (P, hd) each; sin sign-folded
    col = torch.arange(n * hd, device=positions.device)
    partner = col // hd * hd + (col % hd + hd // 2) % hd  # x * cos + roll(x) * sin, head by head
    rotated = col < n_rot * hd
    c = torch.where(rotated, cos[:, col % hd], 1.0) * scale  # (P, N)
    r = torch.diag_embed(c)
    r[:, partner[rotated], col[rotated]] = sin[:, col[rotated] % hd] * scale[rotated]
    return r


class FastStep:
    """One token per call, B rows at the same position: the decoder's layers as a flat sequence of 2-D matmuls,
    against everything prepared once for the turn. Same result as Decoder.forward (a test checks it). Every op counts
    here (a token is a few hundred of them, each a few microseconds): torch.mm, not @; the residual added in place."""

    def __init__(self, decoder, memory_kv, caches, start, max_new_tokens, gather=None):
        cfg, hd, dev = decoder.cfg, decoder.cfg.head_dim, decoder.lm_head.weight.device
        positions = torch.arange(start, start + max_new_tokens, device=dev)
        gain = lambda norm: norm.weight[:, None] * math.sqrt(cfg.d_model)  # x / |x| * gain = RMSNorm(x)
        sa = decoder.layers[0].self_attn  # one matrix rotates (and scales) q and k and leaves v: [q | k | v] @ R
        scale = torch.cat([torch.full((sa.n_q * hd,), hd ** -0.5), torch.ones(2 * sa.n_kv * hd)]).to(dev)
        self.rot = list(rotations(positions, sa.n_q + sa.n_kv, sa.n_kv, cfg, scale))
        ca = decoder.layers[0].cross_attn  # the read's queries: rotated if memory_rope, the same in every layer
        c_rot = None if ca is None or not cfg.memory_rope else list(
            rotations(positions, ca.n_q, 0, cfg, torch.full((ca.n_q * hd,), hd ** -0.5, device=dev)))
        self.layers = []
        for layer, cache, mem in zip(decoder.layers, caches, memory_kv or [None] * len(caches)):
            sa, ca, moe, B = layer.self_attn, layer.cross_attn, layer.moe, cache.kv.size(1)
            k, v = cache.kv.view(2, B * sa.n_kv, cache.max_len, hd)  # views of the cache
            L = dict(qkv=gain(layer.norm1) * sa.qkv_proj.weight.t(), split=[sa.n_q * hd, 2 * sa.n_kv * hd],
                     heads=(B * sa.n_kv, sa.n_q // sa.n_kv, hd),  # grouped K/V: gqa query heads share a key head
                     out=sa.out_proj.weight.t(), out_b=sa.out_proj.bias,
                     write=[cache.kv[:, :, :, p].transpose(0, 1) for p in positions.tolist()],  # (B, 2, Hkv, hd)
                     read=[(k[:, :p + 1].transpose(1, 2), v[:, :p + 1]) for p in positions.tolist()],
                     router=gain(layer.norm3) * moe.router.weight.t(), g3=gain(layer.norm3)[:, 0], k=moe.top_k,
                     w1=moe.w_gate_up, w2=moe.w_down, w1s=moe.w_gate_up.unbind(0), w2s=moe.w_down.unbind(0))
            if moe.b_gate_up is not None:  # expert biases (converted checkpoints): each expert's first bias becomes
                # the last row of its first matrix, met by a 1 appended to the token's input; the second is added
                w1 = torch.cat([moe.w_gate_up, moe.b_gate_up[:, None]], dim=1)  # (E, D + 1, 2H)
                L.update(w1=w1, w1s=w1.unbind(0), one=w1.new_ones(B, 1), b_down=moe.b_down)
            if moe.out_bias is not None:
                L["moe_out_b"] = moe.out_bias
            if ca is not None:  # the memory's K/V are fixed for the turn
                cq = gain(layer.norm2) * ca.qkv_proj.weight[:ca.n_q * hd].t()
                L.update(c_out=ca.out_proj.weight.t(), c_out_b=ca.out_proj.bias, c_heads=(B * ca.n_kv, -1, hd),
                         c_norm=ca.q_norm, c_rot=c_rot, mk=mem[0].flatten(0, 1).transpose(1, 2),
                         mv=mem[1].flatten(0, 1),
                         # scaled up front unless QK-norm comes between projection and scale
                         cq=cq if c_rot is not None or ca.q_norm is not None else cq * hd ** -0.5)
            self.layers.append(L)
        self.head, self.head_b = decoder.lm_head.weight.t(), decoder.lm_head.bias
        norm = decoder.norm  # cfg.final_norm: an RMSNorm (ours), a LayerNorm or none (converted checkpoints)
        self.g = gain(norm)[:, 0] if isinstance(norm, torch.nn.RMSNorm) else None
        self.final_norm = norm if isinstance(norm, torch.nn.LayerNorm) else None
        self.hd, self.start = hd, start
        # copying k experts' weights per token (the gather) costs more than the matmuls on a CPU
        self.views = dev.type == "cpu" and caches[0].kv.size(1) == 1 if gather is None else not gather

    def __call__(self, x, pos):  # x (B, D) the new token's embedding at position pos (overwritten) -> logits (B, V)
        i, hd, B = pos - self.start, self.hd, x.size(0)
        for L in self.layers:
            qkv = torch.mm(torch.mm(x / torch.linalg.vector_norm(x, dim=-1, keepdim=True), L["qkv"]), self.rot[i])
            q, kv = qkv.split(L["split"], dim=1)  # norm, project, RoPE; this position's key and value to the cache:
            L["write"][i].copy_(kv.view(B, 2, -1, hd))
            keys, values = L["read"][i]  # (B*Hkv, hd, T), (B*Hkv, T, hd)
            y = torch.bmm(torch.softmax(torch.bmm(q.reshape(L["heads"]), keys), dim=-1), values)  # (B*Hkv, gqa, hd)
            x = x.addmm_(y.view(B, -1), L["out"]).add_(L["out_b"])  # the residual, in place
            if "cq" in L:  # memory cross-attention over the slots: queries normed (QK-norm), rotated (memory_rope)
                q = torch.mm(x / torch.linalg.vector_norm(x, dim=-1, keepdim=True), L["cq"])
                if L["c_norm"] is not None:
                    q = L["c_norm"](q.view(B, -1, hd)).view(B, -1) * (hd ** -0.5 if L["c_rot"] is None else 1.0)
                if L["c_rot"] is not None:
                    q = torch.mm(q, L["c_rot"][i])
                y = torch.bmm(torch.softmax(torch.bmm(q.view(L["c_heads"]), L["mk"]), dim=-1), L["mv"])
                x = x.addmm_(y.view(B, -1), L["c_out"]).add_(L["c_out_b"])
            h = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            top, e = torch.mm(h, L["router"]).topk(L["k"], dim=-1)  # softmax over the k chosen = renormalised top-k
            h = h * L["g3"]
            if "b_down" in L:  # each chosen expert's output bias, weighted like its output; a 1 for the first bias
                x = x.add_(torch.bmm(torch.softmax(top, dim=-1)[:, None], L["b_down"][e]).view(B, -1))
                h = torch.cat([h, L["one"]], dim=1)
            if self.views:  # one row on the CPU: reading the expert ids costs nothing, the weights are used in place
                top = top[0].tolist()
                w = [math.exp(t - top[0]) for t in top]  # the softmax of k numbers, on the host
                for expert, w_e in zip(e[0].tolist(), w):
                    x = x.addmm_(glu(torch.mm(h, L["w1s"][expert])), L["w2s"][expert], alpha=w_e / sum(w))
            else:  # on a GPU, no host sync: the k experts' weights gathered, run as one batch
                hs = h.unsqueeze(1).expand(B, L["k"], -1).reshape(-1, 1, h.size(-1))  # (B*k, 1, D)
                e = e.view(-1)
                y = torch.bmm(glu(torch.bmm(hs, L["w1"][e])), L["w2"][e])  # the chosen experts: (B*k, 1, D)
                x = x.add_(torch.bmm(torch.softmax(top, dim=-1).view(B, 1, -1), y.view(B, L["k"], -1)).view(B, -1))
            if "moe_out_b" in L:
                x = x.add_(L["moe_out_b"])
        if self.g is not None:  # the final RMSNorm, its gain folded in
            x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.g
        elif self.final_norm is not None:  # a LayerNorm (converted checkpoints), as it is
            x = self.final_norm(x)
        return torch.mm(x, self.head) + self.head_b


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
    exact = contextlib.nullcontext
    if attn_mask is None and torch.is_autocast_enabled(ids.device.type):
        # FastStep computes in the weights' dtype, so under autocast the prompt runs without it too: one dtype in
        # the cache, the memory's K/V and the weights
        exact = lambda: torch.autocast(ids.device.type, enabled=False)
        memory_kv = memory_kv and [kv and tuple(t.to(decoder.lm_head.weight.dtype) for t in kv) for kv in memory_kv]
    with exact():
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
            with exact():
                logits = fast(embed(tok), T + step)
        else:  # each row at its own position (right padding); keys up to this step's slot in the cache
            pos = lengths + step
            logits, _ = decoder(embed(tok[:, None]), memory_kv, rope_cs=(cos[pos][:, None, None], sin[pos][:, None, None]),
                                self_mask=key_valid[:, None, None, :T + step + 1], caches=caches)
            logits = logits[:, -1]


# -----------------------------------------------------------------------------
# The entry points: a model and its memory in, answers out (chat, evaluation, MRL rollouts and bench call these)


@torch.no_grad()
def interact(model, query_ids, stm, eos_id=None, **sampling):
    """Yield RxT's answer token ids (ints) to one query `[BOS][Q] query [A]`, reading STM (L, 1, S, D); stops before
    [EOS]. The caller then writes the turn with model.update_memory (chat.py does it in a background thread).
    Sampling: temperature, top_k, top_p, max_new_tokens, generator."""
    ids = torch.as_tensor(query_ids, device=model.embed.weight.device).view(1, -1)
    memory_kv = model.decoder.project_memory(stm)  # the STM's K/V: once per turn
    for tok in stream(model.decoder, model.embed, ids, None, memory_kv, eos_id=eos_id, **sampling):
        tok = tok.item()
        if tok == eos_id:
            return
        yield tok


@torch.no_grad()
def generate(model, ids, attn_mask=None, stm=None, eos_id=None, **sampling):
    """Batched answers to right-padded prompts ids (B, T): RxT reads its STM (L, B, S, D); the stateless baseline
    (stm None) has the whole conversation in its prompt. Returns tokens (B, N) and each row's length up to and
    including its first [EOS]."""
    memory_kv = None if stm is None else model.decoder.project_memory(stm)
    tokens = torch.stack(list(stream(model.decoder, model.embed, ids, attn_mask, memory_kv, eos_id=eos_id,
                                     **sampling)), dim=1)
    lengths = torch.full((ids.size(0),), tokens.size(1), device=ids.device)
    if eos_id is not None:
        is_eos = tokens == eos_id
        lengths = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1, lengths)
    return tokens, lengths
