"""
Stages 3-5 - teaching the memory to remember (DESIGN.md section 4).

After stages 0-2 the model can talk, but nothing carries from one turn to the next. Three phases, run in order
(`phases`), each starting from the previous one's checkpoint and writing out_dir/<phase>/ckpt.pt:

  mem   3. memory-attention pre-training (self-supervised): from a random STM, for each interaction of an episode,
           label = (1 - w) * STM_{t-1} + w * ED_t and loss = -cos(STM_t, label). w = 0.9 for the first interaction
           (mostly new information), then 0.5 - 0.05 t, jittered. Only the memory attention trains.
  smat  4. supervised memory-aware training: encode interaction t-1 -> update STM -> the decoder answers
           interaction t reading the STM; cross-entropy on answer tokens, summed over the episode. Unfreezing:
           decoder first, then memory attention, then encoder (+ shared embedding).
  mrl   5. Memory Reinforcement Learning with IMPO (PPO without GAE): the model answers each turn itself (sampled),
           writes its own interaction into memory, and is rewarded by BLEU against the reference answer and exact
           match on the probe. Advantage = r - V(s) from a critic (encoder copy + value head), normalised; clipped
           surrogate, entropy bonus, memory regularisation 1e-4 sqrt(t+1) MSE(STM_t, STM_{t-1}); curriculum of
           episode lengths; random STM resets; old log-probs from a clean forward pass.

    python train_mrl.py config/nano_mrl.py --init_from=out/nano/sft/ckpt.pt [--phases=smat,mrl ...]
"""

import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import training
from data.loaders import collate_interactions, collate_queries, episode_turns
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer
from train_joint import ar_loss

DEFAULTS = dict(
    training.TRAIN_DEFAULTS,
    data_dir="data/cache/world",
    episodes_file="episodes_train.jsonl",
    out_dir="out/nano",  # phase p writes out_dir/p/ckpt.pt
    phases="mem,smat,mrl",
    seq_len=128,  # longest interaction
    # curricula: lists of episode distances (turns from fact to probe), stepped through evenly over a phase
    mem_curriculum=[[1, 2, 4]], smat_curriculum=[[1, 2], [1, 2, 4], [1, 2, 4, 8]], mrl_curriculum=[[2], [4], [8], [16]],
    mem_iters=100, smat_iters=500, mrl_iters=200,
    mem_lr=1e-3, smat_lr=5e-4, mrl_lr=5e-5,
    # stage 3
    mem_noise=0.05,  # Gaussian noise on the STM input and on the label
    mem_jitter=0.15,
    # stage 4
    unfreeze_memory_at=0.0, unfreeze_encoder_at=0.5,  # fractions of smat_iters
    # In both phases the decoder reads the memory that the last write produced, with gradients, so every turn's loss
    # trains the write before it. *_detach_stm=True detaches the *input* of each write (one-step truncated BPTT):
    # the loss of turn t trains the write of turn t-1 but not the earlier ones.
    smat_detach_stm=True,
    aux_weight=0.01,
    # stage 5
    mrl_detach_stm=True,
    max_answer=24, temperature=1.0, top_k=0, top_p=1.0,
    ppo_epochs=2, clip_eps=0.2, entropy_coef=0.01, value_coef=0.5, memory_reg=1e-4, kl_coef=0.05,
    bleu_weight=1.0, recall_weight=1.0, cosine_weight=0.0,
    random_reset_prob=0.2, random_reset_std=0.5,
)


# -----------------------------------------------------------------------------
# Episodes as tensors


def sample_episodes(by_distance, distances, batch_size, g):
    """A batch of episodes of one distance (so every episode has the same number of turns)."""
    d = distances[torch.randint(len(distances), (1,), generator=g).item()]
    pool = by_distance[d]
    return [pool[i] for i in torch.randint(len(pool), (batch_size,), generator=g).tolist()]


def turn_tensors(tok, episodes, seq_len, device, pad_to=None):
    """Per turn: (ids, mask, loss_mask) of the full interactions, (B, T) right-padded."""
    turns, out = [episode_turns(ep) for ep in episodes], []
    for t in range(len(turns[0])):
        ids, mask, loss_mask = collate_interactions(tok, [tr[t] for tr in turns], seq_len)
        if pad_to is not None and ids.size(1) < pad_to:  # stage 3 pairs token i with slot i: T = S
            extra = pad_to - ids.size(1)
            ids = F.pad(ids, (0, extra), value=tok.pad_id)
            mask, loss_mask = F.pad(mask, (0, extra)), F.pad(loss_mask, (0, extra))
        out.append((ids.to(device), mask.to(device), loss_mask.to(device)))
    return out


def curriculum(stages, step, max_iters):
    """The curriculum entry for this step: the stages are stepped through in equal parts of the phase."""
    return stages[min(len(stages) - 1, step * len(stages) // max(1, max_iters))]


# -----------------------------------------------------------------------------
# Stage 3: self-supervised memory-attention pre-training


def memory_pretrain_loss(model, turns, cfg, g):
    """-cos(STM_t, (1 - w) STM_{t-1} + w ED_t) averaged over the turns of the episodes."""
    S = model.cfg.stm_size
    stm = model.new_memory(turns[0][0].size(0), generator=g)
    losses = []
    for t, (ids, mask, _) in enumerate(turns):
        ids, mask = ids[:, :S], mask[:, :S]
        with torch.no_grad():
            ed, _ = model.encode(ids, mask)  # (L, B, S, D)
        noisy = stm + cfg["mem_noise"] * torch.randn(stm.shape, generator=g, device=stm.device)
        new = model.memory_attention(noisy, ed, mask)
        w = 0.9 if t == 0 else 0.5 - 0.05 * t
        w = min(0.95, max(0.05, w + cfg["mem_jitter"] * (2 * torch.rand(1, generator=g, device=stm.device).item() - 1)))
        with torch.no_grad():  # the label is built from the inputs, never from the model's own output
            label = (1 - w) * stm + w * ed
            label = label + cfg["mem_noise"] * torch.randn(label.shape, generator=g, device=label.device)
        losses.append(-F.cosine_similarity(new.float(), label.float(), dim=-1).mean())
        stm = new.detach()
    loss = torch.stack(losses).mean()
    return loss, {"cos_loss": loss.detach(), "tokens": sum(m.sum().item() for _, m, _ in turns)}


# -----------------------------------------------------------------------------
# Stage 4: supervised memory-aware training


def smat_loss(model, turns, cfg, g):
    """Decode turn 1 from a fresh memory; then for every later turn t: encode turn t-1 -> update STM -> decode turn t
    reading it. Answer-token CE summed over the episode."""
    stm = model.new_memory(turns[0][0].size(0), generator=g)
    total, metrics = 0.0, {}
    for t in range(len(turns)):
        if t > 0:
            ids, mask, _ = turns[t - 1]
            stm = model.update_memory(stm.detach() if cfg["smat_detach_stm"] else stm, ids, mask)
        ids, mask, loss_mask = turns[t]
        logits, aux = model.decode(ids, stm)
        loss, acc = ar_loss(logits, ids, loss_mask)
        total = total + loss + cfg["aux_weight"] * aux
        if t == len(turns) - 1:  # the probe: teacher-forced accuracy of the recalled answer
            metrics.update(probe_loss=loss.detach(), probe_acc=acc)
    metrics.update(smat_loss=total.detach() / len(turns), tokens=sum(m.sum().item() for _, m, _ in turns))
    return total, metrics


def set_trainable(model, step, cfg):
    """Unfreeze schedule: decoder first, then memory attention, then encoder with the shared embedding."""
    n = cfg["max_iters"]
    groups = {"decoder": True, "memory_attention": step >= cfg["unfreeze_memory_at"] * n,
              "encoder": step >= cfg["unfreeze_encoder_at"] * n}
    groups["embed"] = groups["encoder"]
    groups["mlm_head"] = False
    for name, p in model.named_parameters():
        p.requires_grad_(groups[name.split(".")[0]])


# -----------------------------------------------------------------------------
# Stage 5: Memory Reinforcement Learning (IMPO)


def bleu(cand, cand_len, ref, ref_len, max_n=4):
    """Per-sentence BLEU on token ids, vectorised (TensorBLEU style): n-grams by unfold, counted per sentence through
    torch.unique, clipped by the reference counts; brevity penalty; add-one smoothing for n > 1.
    cand (B, Lc), ref (B, Lr) right-padded, lengths (B,) -> (B,) in [0, 1]."""
    B, device = cand.size(0), cand.device
    rows = torch.arange(B, device=device)[:, None]
    log_p = []
    for n in range(1, max_n + 1):
        grams, owners, counts_of = [], [], []
        for seq, length in ((cand, cand_len), (ref, ref_len)):
            if seq.size(1) >= n:
                g = seq.unfold(1, n, 1)  # (B, L-n+1, n)
                valid = torch.arange(g.size(1), device=device)[None] + n <= length[:, None]
            else:
                g = seq.new_zeros(B, 0, n)
                valid = torch.zeros(B, 0, dtype=torch.bool, device=device)
            grams.append(g[valid])
            owners.append(rows.expand_as(valid)[valid])
            counts_of.append(valid.sum(dim=1))
        uniq, inverse = torch.unique(torch.cat(grams), dim=0, return_inverse=True)
        U = max(1, uniq.size(0))
        n_cand = grams[0].size(0)
        c_counts = torch.bincount(owners[0] * U + inverse[:n_cand], minlength=B * U).view(B, U)
        r_counts = torch.bincount(owners[1] * U + inverse[n_cand:], minlength=B * U).view(B, U)
        matches = torch.minimum(c_counts, r_counts).sum(dim=1).float()
        total = counts_of[0].float()
        p = matches / total.clamp(min=1) if n == 1 else (matches + 1) / (total + 1)
        log_p.append(torch.log(p.clamp(min=1e-30)) if n > 1 else torch.log(p).nan_to_num(neginf=-1e30))
    c, r = cand_len.float(), ref_len.float()
    bp = torch.where(c > r, torch.ones_like(c), torch.exp(1 - r / c.clamp(min=1)))
    score = bp * torch.exp(torch.stack(log_p).mean(dim=0))
    return torch.where(cand_len > 0, score, torch.zeros_like(score))


class Critic(nn.Module):
    """IMPO's value function V(s): a copy of the encoder reads the query; a small head reads it with the memory."""

    def __init__(self, model):
        super().__init__()
        D = model.cfg.d_model
        self.embed, self.encoder = copy.deepcopy(model.embed), copy.deepcopy(model.encoder)
        self.head = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, 1))

    def forward(self, ids, mask, stm):  # (B, T), (B, T), (L, B, S, D) -> (B,)
        _, h = self.encoder(self.embed(ids), mask)
        pooled = (h * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.head(torch.cat([pooled, stm.mean(dim=(0, 2))], dim=-1)).squeeze(-1)


def join_answers(q_ids, q_mask, ans, ans_len, tok):
    """Right-padded interactions `query answer` (B, T), their mask, and the mask of sampled answer positions
    (ans_mask[:, t] True iff ids[:, t+1] was sampled). An answer cut by max_answer gets an [EOS] (not sampled)."""
    rows, sampled = [], []
    for b in range(q_ids.size(0)):
        q = q_ids[b, :int(q_mask[b].sum())].tolist()
        a = ans[b, :int(ans_len[b])].tolist()
        rows.append(q + a + ([] if a and a[-1] == tok.eos_id else [tok.eos_id]))
        sampled.append((len(q), len(q) + len(a)))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    ans_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (r, (start, end)) in enumerate(zip(rows, sampled)):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), True
        ans_mask[b, start - 1:end - 1] = True
    d = q_ids.device
    return ids.to(d), mask.to(d), ans_mask.to(d)


def rewards(model, ans, ans_len, ref_ids, ref_mask, is_probe, cfg, tok):
    """BLEU vs the reference answer, + exact match on the probe (the memory test), + optional embedding cosine."""
    ref_len = ref_mask.sum(dim=1)
    r = cfg["bleu_weight"] * bleu(ans, ans_len, ref_ids, ref_len)
    if is_probe:
        # exact match of the whole answer, [EOS] included on both sides: a right answer cut short is not right
        L = min(ans.size(1), ref_ids.size(1))
        same = ((ans[:, :L] == ref_ids[:, :L]) | ~ref_mask[:, :L]).all(dim=1) & (ans_len == ref_len)
        r = r + cfg["recall_weight"] * same.float()
    if cfg["cosine_weight"]:
        e = model.embed
        am = torch.arange(ans.size(1), device=ans.device)[None] < ans_len[:, None]
        mean_a = (e(ans) * am[..., None]).sum(1) / am.sum(1, keepdim=True).clamp(min=1)
        ref_tokens = ref_ids.masked_fill(~ref_mask, tok.pad_id)  # pads are -1 (so they never match): not embeddable
        mean_r = (e(ref_tokens) * ref_mask[..., None]).sum(1) / ref_mask.sum(1, keepdim=True).clamp(min=1)
        r = r + cfg["cosine_weight"] * F.cosine_similarity(mean_a, mean_r, dim=-1)
    return r


@torch.no_grad()
def rollout(model, episodes, tok, cfg, g, reward_fn=rewards):
    """Play a batch of episodes with the current policy. The first turn (the facts) is written as given; every later
    turn the model answers itself (sampled) and its own interaction is written into memory."""
    device = model.embed.weight.device
    turns = [episode_turns(ep) for ep in episodes]
    B, N = len(episodes), len(turns[0])
    stm = model.new_memory(B, generator=g)
    if torch.rand(1, generator=g, device=device).item() < cfg["random_reset_prob"]:  # random STM reset
        stm = stm / model.cfg.stm_init_std * cfg["random_reset_std"]
    ids, mask, _ = collate_interactions(tok, [tr[0] for tr in turns], cfg["seq_len"])
    first = (ids.to(device), mask.to(device))
    stm0 = stm
    stm = model.update_memory(stm, *first)
    steps = []
    for t in range(1, N):
        q_ids, q_mask = collate_queries(tok, [tr[t]["query"] for tr in turns], cfg["seq_len"] - cfg["max_answer"])
        q_ids, q_mask = q_ids.to(device), q_mask.to(device)
        ans, ans_len = model.generate(q_ids, q_mask, stm, max_new_tokens=cfg["max_answer"],
                                      temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                                      top_p=cfg["top_p"], eos_id=tok.eos_id, generator=g)
        refs = [tok.encode(tr[t]["answer"]) + [tok.eos_id] for tr in turns]
        R = max(map(len, refs))
        ref_ids = torch.tensor([r + [tok.pad_id] * (R - len(r)) for r in refs], device=device)
        ref_mask = ref_ids != tok.pad_id
        ref_ids = ref_ids.masked_fill(~ref_mask, -1)  # pads never match
        reward = reward_fn(model, ans, ans_len, ref_ids, ref_mask, t == N - 1, cfg, tok)
        ids, mask, ans_mask = join_answers(q_ids, q_mask, ans, ans_len, tok)
        steps.append(dict(q_ids=q_ids, q_mask=q_mask, ids=ids, mask=mask, ans_mask=ans_mask, reward=reward))
        stm = model.update_memory(stm, ids, mask)
    return dict(stm0=stm0, first=first, steps=steps)


def answer_logprobs(model, ids, stm):
    """Log-prob of each next token of ids and the policy entropy, both (B, T-1), from a clean forward pass (not the
    temperature / top-k filtered sampling distribution); the caller keeps the sampled positions (ans_mask)."""
    logits, _ = model.decode(ids, stm)
    logp_all = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy


def impo_loss(model, critic, play, cfg):
    """Clipped surrogate + value loss - entropy bonus + memory regularisation + policy-stability KL over the turns of
    a rollout. The memory chain is replayed with gradients: the decoder answers turn t from STM_{t-1} as the last
    write produced it, so the policy loss trains the encoder and the memory attention too."""
    stm = model.update_memory(play["stm0"], *play["first"])
    total, metrics = 0.0, {"reward": 0.0, "probe_reward": 0.0, "ratio": 0.0, "kl": 0.0}
    n = len(play["steps"])
    for t, s in enumerate(play["steps"], start=1):
        m = s["ans_mask"][:, :-1]
        logp, entropy = answer_logprobs(model, s["ids"], stm)
        if "old_logp" not in s:  # first epoch on this rollout: the old policy is the current one, before any update
            s["old_logp"] = logp.detach()
        value = critic(s["q_ids"], s["q_mask"], stm.detach())
        adv = s["reward"] - value.detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-6) if adv.numel() > 1 else adv
        log_ratio = logp - s["old_logp"]
        ratio = torch.exp(log_ratio)
        surrogate = torch.minimum(ratio * adv[:, None], ratio.clamp(1 - cfg["clip_eps"], 1 + cfg["clip_eps"]) * adv[:, None])
        tokens = m.sum().clamp(min=1)
        policy_loss = -(surrogate * m).sum() / tokens
        entropy_bonus = (entropy * m).sum() / tokens
        # IMPO's policy stabilisation: KL(pi_old || pi) between the policy that sampled this rollout (the previous
        # update step's) and the current one, estimated on the sampled tokens as (r - 1) - log r, r = pi / pi_old
        # (>= 0, and 0 exactly when the policy did not move)
        kl = ((ratio - 1 - log_ratio) * m).sum() / tokens
        value_loss = F.mse_loss(value, s["reward"])
        stm_prev = stm.detach() if cfg["mrl_detach_stm"] else stm
        new_stm = model.update_memory(stm_prev, s["ids"], s["mask"])
        mem_reg = cfg["memory_reg"] * math.sqrt(t + 1) * F.mse_loss(new_stm, stm_prev)
        total = (total + policy_loss - cfg["entropy_coef"] * entropy_bonus + cfg["value_coef"] * value_loss + mem_reg
                 + cfg["kl_coef"] * kl)
        stm = new_stm
        metrics["reward"] += s["reward"].mean().item() / n
        metrics["ratio"] += ((ratio * m).sum() / tokens).item() / n
        metrics["kl"] += kl.item() / n
        if t == n:
            metrics["probe_reward"] = s["reward"].mean().item()
    metrics["tokens"] = sum(s["mask"].sum().item() for s in play["steps"])
    return total / n, metrics


# -----------------------------------------------------------------------------


def main(argv):
    cfg = training.configure(DEFAULTS, argv)
    device, ctx, rank, world = training.setup(cfg)
    tok = Tokenizer.from_file(os.path.join(cfg["data_dir"], "tokenizer.tiktoken"))
    episodes = read_jsonl(os.path.join(cfg["data_dir"], cfg["episodes_file"]))
    n_val = max(1, len(episodes) // 50)
    by_distance = {"train": {}, "val": {}}
    for i, ep in enumerate(episodes):
        by_distance["val" if i < n_val else "train"].setdefault(ep["distance"], []).append(ep)

    init_from, results = cfg["init_from"], {}
    for phase in [p for p in cfg["phases"].split(",") if p]:
        if phase not in ("mem", "smat", "mrl"):
            raise training.ConfigError(f"unknown phase {phase!r} (mem, smat, mrl)")
        n = cfg[f"{phase}_iters"]
        pcfg = dict(cfg, init_from=init_from, out_dir=os.path.join(cfg["out_dir"], phase), max_iters=n,
                    lr=cfg[f"{phase}_lr"], min_lr=cfg[f"{phase}_lr"] / 10,
                    warmup_iters=min(cfg["warmup_iters"], max(1, n // 10)))  # a short phase still reaches its lr
        model = training.init_model(pcfg, tok, device)
        stages = pcfg[f"{phase}_curriculum"]

        state = {"step": 0, "play": None}

        def on_step(step, model=model, pcfg=pcfg, phase=phase):
            state["step"] = step
            if phase == "smat":
                set_trainable(model, step, pcfg)

        def get_batch(split, g, pcfg=pcfg, stages=stages):
            distances = curriculum(stages, state["step"], pcfg["max_iters"])
            pool = by_distance[split]
            distances = [d for d in distances if d in pool] or sorted(pool)[:1]
            return sample_episodes(pool, distances, pcfg["batch_size"], g)

        extra, params = {}, list(model.parameters())
        if phase == "mem":
            params = list(model.memory_attention.parameters())

            def loss_fn(model, eps, g, pcfg=pcfg):
                return memory_pretrain_loss(model, turn_tensors(tok, eps, pcfg["seq_len"], device,
                                                                pad_to=model.cfg.stm_size), pcfg, g)
        elif phase == "smat":
            params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")]

            def loss_fn(model, eps, g, pcfg=pcfg):
                return smat_loss(model, turn_tensors(tok, eps, pcfg["seq_len"], device), pcfg, g)
        else:
            critic = Critic(model).to(device)
            extra = {"critic": critic}
            params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")]
            params += list(critic.parameters())

            def loss_fn(model, eps, g, pcfg=pcfg, critic=critic):
                # a rollout is reused for ppo_epochs optimizer steps: the clipped ratio keeps the later ones honest
                if not model.training:  # evaluation: a fresh rollout every batch
                    return impo_loss(model, critic, rollout(model, eps, tok, pcfg, g), pcfg)
                if state["play"] is None or state["step"] % pcfg["ppo_epochs"] == 0:
                    state["play"] = rollout(model, eps, tok, pcfg, g)
                return impo_loss(model, critic, state["play"], pcfg)

        results[phase] = training.train(pcfg, model, stage=phase, loss_fn=loss_fn, get_batch=get_batch, device=device,
                                        ctx=ctx, rank=rank, world=world, tokenizer=tok, params=params,
                                        on_step=on_step, extra_modules=extra)
        init_from = os.path.join(pcfg["out_dir"], "ckpt.pt")
    return results


if __name__ == "__main__":
    training.cli(main)
