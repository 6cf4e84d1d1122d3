"""
The objectives of the memory stages' last phase (train_mrl.py runs them): the model plays or scores whole episodes
through its memory, and learns from how its answers compare - with rewards (MRL: IMPO, the RxT paper's PPO for
memory) or with preferences (DMPO, the direct preference optimisation that replaced MRL in RxLM).

  rewards, rollout, clipped_surrogate, impo_loss     MRL: play episodes with the current policy, score them, IMPO
  answer_logprob, dpo_loss, dmpo_loss                DMPO: DPO through the memory chain
"""

import math

import torch
import torch.nn.functional as F

import engine
from data.loaders import collate_interactions, collate_queries, episode_turns, join_answers, length_chunks, pad_rows
from model import token_logprobs
from scores import bleu, exact_match


# -----------------------------------------------------------------------------
# Stage 5: Memory Reinforcement Learning (IMPO)


def rewards(model, ans, ans_len, ref_ids, ref_mask, is_probe, cfg, tok):
    """BLEU vs the reference answer, + exact match on the probe (the memory test), + optional embedding cosine.
    ans (B, N) with lengths counting [EOS]; ref_ids (B, R) with [EOS], pads -1 (they never match)."""
    ref_len = ref_mask.sum(dim=1)
    r = cfg["mrl_bleu_weight"] * bleu(ans, ans_len, ref_ids, ref_len)
    if is_probe:
        r = r + cfg["mrl_recall_weight"] * exact_match(ans, ans_len, ref_ids, ref_mask).float()
    if cfg["mrl_cosine_weight"]:
        am = torch.arange(ans.size(1), device=ans.device)[None] < ans_len[:, None]
        mean_a = (model.embed(ans) * am[..., None]).sum(1) / am.sum(1, keepdim=True).clamp(min=1)
        ref_tokens = ref_ids.masked_fill(~ref_mask, tok.pad_id)  # the -1 pads are not embeddable
        mean_r = (model.embed(ref_tokens) * ref_mask[..., None]).sum(1) / ref_mask.sum(1, keepdim=True).clamp(min=1)
        r = r + cfg["mrl_cosine_weight"] * F.cosine_similarity(mean_a, mean_r, dim=-1)
    return r


@torch.no_grad()
def rollout(model, episodes, tok, cfg, g, reward_fn=rewards):
    """Play a batch of episodes with the current policy. The first turn (the facts) is written as given; every later
    turn the model answers itself (sampled), is rewarded, and its own interaction is written into memory."""
    device = model.embed.weight.device
    turns = [episode_turns(ep) for ep in episodes]
    reset = torch.rand(1, generator=g, device=device).item() < cfg["mrl_reset_prob"]  # a random STM reset
    stm = model.new_memory(len(episodes), generator=g, std=cfg["mrl_reset_std"] if reset else None)
    ids, attn_mask, _ = collate_interactions(tok, [tr[0] for tr in turns], cfg["seq_len"])
    ids, attn_mask = ids.to(device), attn_mask.to(device)
    play = dict(stm0=stm, first=(ids, attn_mask, length_chunks(attn_mask) if cfg["chunks"] else None), steps=[])
    stm = model.update_memory(stm, *play["first"])
    for t in range(1, len(turns[0])):
        q_ids, q_mask = [x.to(device) for x in collate_queries(tok, [tr[t]["query"] for tr in turns], cfg["seq_len"],
                                                                cfg["mrl_max_answer"])]
        ans, ans_len = engine.generate(model, q_ids, q_mask, stm, max_new_tokens=cfg["mrl_max_answer"],
                                      temperature=cfg["mrl_temperature"], top_k=cfg["mrl_top_k"] or None,
                                      top_p=cfg["mrl_top_p"], eos_id=tok.eos_id, generator=g)
        ref_ids, ref_mask = pad_rows([tok.encode(tr[t]["answer"]) + [tok.eos_id] for tr in turns], tok.pad_id)
        ref_ids, ref_mask = ref_ids.masked_fill(~ref_mask, -1).to(device), ref_mask.to(device)
        reward = reward_fn(model, ans, ans_len, ref_ids, ref_mask, t == len(turns[0]) - 1, cfg, tok)
        ids, attn_mask, ans_mask = join_answers(q_ids, q_mask, ans, ans_len, tok)
        chunks = length_chunks(attn_mask) if cfg["chunks"] else None
        old_logp = token_logprobs(model.decode(ids, stm, attn_mask=attn_mask, chunks=chunks)[0], ids)[0]
        play["steps"].append(dict(q_ids=q_ids, q_mask=q_mask, ids=ids, mask=attn_mask, ans_mask=ans_mask,
                                  reward=reward, old_logp=old_logp, chunks=chunks))
        stm = model.update_memory(stm, ids, attn_mask, chunks)
    return play


def clipped_surrogate(logp, old_logp, adv, eps):
    """PPO's objective per token, min(r A, clip(r, 1 - eps, 1 + eps) A) with r = pi / pi_old: no gain from moving
    the policy further than eps from the one that sampled. Returns it and r."""
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv), ratio


def impo_loss(model, critic, play, cfg):
    """Clipped surrogate + value loss - entropy bonus + memory regularisation + policy-stability KL over the turns of
    a rollout. The memory chain is replayed with gradients: the decoder answers turn t from STM_{t-1} as the last
    write produced it, so the policy loss trains the encoder and the memory attention too."""
    stm = model.update_memory(play["stm0"], *play["first"])
    total, metrics = 0.0, {"reward": 0.0, "probe_reward": 0.0, "ratio": 0.0, "kl": 0.0}
    n = len(play["steps"])
    for t, s in enumerate(play["steps"], start=1):
        m = s["ans_mask"][:, :-1]
        tokens = m.sum().clamp(min=1)
        logp, entropy = token_logprobs(model.decode(s["ids"], stm, attn_mask=s["mask"], chunks=s["chunks"])[0],
                                       s["ids"])
        value = critic(s["q_ids"], s["q_mask"], stm.detach())
        adv = s["reward"] - value.detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-6) if adv.numel() > 1 else adv
        surrogate, ratio = clipped_surrogate(logp, s["old_logp"], adv[:, None], cfg["mrl_clip_eps"])
        # IMPO's policy stabilisation: KL(pi_old || pi) between the policy that sampled this rollout (the previous
        # update step's) and the current one, estimated on the sampled tokens as (r - 1) - log r with r = pi / pi_old
        # (>= 0, and 0 exactly when the policy did not move)
        kl = ((ratio - 1 - (logp - s["old_logp"])) * m).sum() / tokens
        stm_prev = stm.detach() if cfg["mrl_detach_stm"] else stm
        new_stm = model.update_memory(stm_prev, s["ids"], s["mask"], s["chunks"])
        mem_reg = cfg["mrl_memory_reg"] * math.sqrt(t + 1) * F.mse_loss(new_stm, stm_prev)
        total = (total - (surrogate * m).sum() / tokens - cfg["mrl_entropy_coef"] * (entropy * m).sum() / tokens
                 + cfg["mrl_value_coef"] * F.mse_loss(value, s["reward"]) + mem_reg + cfg["mrl_kl_coef"] * kl)
        stm = new_stm
        for key, v in (("reward", s["reward"].mean()), ("ratio", (ratio * m).sum() / tokens), ("kl", kl)):
            metrics[key] += v.item() / n
    metrics.update(probe_reward=play["steps"][-1]["reward"].mean().item(),
                   tokens=sum(s["mask"].sum().item() for s in play["steps"]))
    return total / n, metrics


# -----------------------------------------------------------------------------
# Stage 5': DMPO. Where it follows RxLM's description (docs/research/dmpo-smat-improvements.md, January 2026): the
# DPO loss per pair with a frozen reference that reads the policy's (detached) memory; memory written from accepted
# interactions only; gradients through the whole memory chain; the anchored variant's |log pi/ref| of a neutral
# answer. Where it departs, and why: (1) the probe is answered from STM_{t-1}, the memory before the turn, as in
# SMAT and in chat - RxLM's algorithm writes the accepted turn first and scores the answers reading STM_t, which
# holds the accepted answer itself; (2) log-probabilities are summed over the answer tokens (DPO's sequence
# likelihood), not averaged; (3) pairs only at the probe: the world knows exactly which wrong answers matter there.


def answer_logprob(model, ids, attn_mask, targets, stm, chunked=True):
    """Summed log-probability of each row's answer tokens (the targets that count), reading stm: (B,)."""
    logits = model.decode(ids, stm, attn_mask=attn_mask, chunks=length_chunks(attn_mask) if chunked else None)[0]
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
    return logp.view(targets.shape).sum(dim=1)


def dpo_loss(policy_w, policy_l, ref_w, ref_l, beta):
    """-log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), the mean over rows (DPO,
    Rafailov et al. 2023); log 2 while the policy is the reference. Also returns the implicit reward margins."""
    margin = beta * ((policy_w - ref_w) - (policy_l - ref_l))
    return -F.logsigmoid(margin).mean(), margin.detach()


def dmpo_loss(model, reference, batch, cfg, tok, g):
    """Write every turn before the probe from its accepted (reference) interaction; at the probe, DPO of the
    accepted over the rejected answer, both read from the memory those writes left."""
    turns, episodes = batch["turns"], batch["episodes"]
    stm = model.new_memory(len(episodes), generator=g)
    for ids, attn_mask, _ in turns[:-1]:
        stm = model.update_memory(stm.detach() if cfg["dmpo_detach_stm"] else stm, ids, attn_mask,
                                  length_chunks(attn_mask) if cfg["chunks"] else None)
    probe = [episode_turns(ep)[-1]["query"] for ep in episodes]
    rejected = [text for _, text in batch["rejected"]]
    own = [b for b, (kind, _) in enumerate(batch["rejected"]) if kind == "own"]
    if own:  # on-policy: the model's own greedy answer, where it is wrong (else another value of the slot)
        q_ids, q_mask = collate_queries(tok, [probe[b] for b in own], cfg["seq_len"], 16)
        ans, ans_len = engine.generate(model, q_ids.to(stm.device), q_mask.to(stm.device), stm.detach()[:, own],
                                       max_new_tokens=16, temperature=0, eos_id=tok.eos_id)
        for i, b in enumerate(own):
            said = tok.decode([t for t in ans[i, :ans_len[i]].tolist() if t != tok.eos_id]).strip()
            rejected[b] = said if said and said != episodes[b]["gold"] else batch["fallback"][b]
    wrong = [{"query": q, "answer": a} for q, a in zip(probe, rejected)]
    pairs = {"w": turns[-1], "l": collate_interactions(tok, wrong, cfg["seq_len"])}  # accepted: the episode's probe
    if cfg["dmpo_anchor"] > 0:
        pairs["n"] = collate_interactions(tok, [{"query": q, "answer": cfg["dmpo_neutral"]} for q in probe],
                                          cfg["seq_len"])
    pairs = {k: [t.to(stm.device) for t in v] for k, v in pairs.items()}
    policy = {k: answer_logprob(model, *v, stm, cfg["chunks"]) for k, v in pairs.items()}
    with torch.no_grad():
        ref = {k: answer_logprob(reference, *v, stm.detach(), cfg["chunks"]) for k, v in pairs.items()}
    loss, margin = dpo_loss(policy["w"], policy["l"], ref["w"], ref["l"], cfg["dmpo_beta"])
    metrics = {"dpo_loss": loss.detach(), "margin": margin.mean(),
               "pref_acc": (policy["w"] > policy["l"]).float().mean()}  # the policy ranks the accepted answer first
    if "n" in pairs:  # anchored: the neutral answer stays where the reference had it
        anchor = (policy["n"] - ref["n"]).abs().mean()
        loss, metrics["anchor"] = loss + cfg["dmpo_anchor"] * anchor, anchor.detach()
    metrics["tokens"] = sum(m.sum().item() for _, m, _ in turns)
    return loss, metrics
