"""
Stages 3-5 - teaching the memory to remember. After stages 0-2 the model can talk, but nothing carries from one turn
to the next. The phases run in order (`phases`), each from the previous one's checkpoint, into out_dir/<phase>/:

  mem   3. memory-attention pre-training (self-supervised): the write learns to move the STM towards a weighted mean
           of the old STM and the new ED (cosine loss). Only the memory attention trains.
  smat  4. Supervised Memory-Aware Training (SMAT): teacher-forced episodes - the decoder answers each turn reading
           the STM that holds the turns before it; cross-entropy on the answers, through the whole memory chain.
  mrl   5. Memory Reinforcement Learning with IMPO (Implicit Memory Policy Optimization, the RxT paper's PPO variant
           for memory: no GAE, a memory regulariser, a policy-stability KL). The model answers each turn itself,
           writes its own answers into memory, and is rewarded by BLEU against the reference plus exact match on the
           probe; a critic (an encoder copy + value head) gives the baseline V(s).
  dmpo  5'. Direct Memory and Preference Optimization, the stage that replaced MRL in RxLM: DPO through the memory
           chain. The memory is written from the accepted (reference) turns only; at the probe the model scores the
           accepted answer against a rejected one (the other person's value, the value before a change, another
           value, or its own wrong answer) relative to a frozen reference model, the phase's starting point.

    python train_mrl.py config/nano_mrl.py [--phases=smat,mrl ...]      # or --phases=smat,dmpo

The objectives of mem and smat are below; those of mrl and dmpo, which play or score whole episodes, are in rl.py.
"""

import os

import torch
import torch.nn.functional as F

import cli
import training
from data.loaders import REJECTED_KINDS, episode_pools, episode_tensors, length_chunks, rejected_answer
from data.memory_world import SLOTS, read_jsonl
from data.tokenizer import Tokenizer
from model import Critic, token_accuracy
from rl import dmpo_loss, impo_loss, rollout

PHASES = ("mem", "smat", "mrl", "dmpo")  # every key that only one phase reads starts with that phase's name
DEFAULTS = dict(
    # each phase has its own iterations and learning rate (cosine to a tenth of it): no generic max_iters, lr, min_lr
    {k: v for k, v in training.TRAIN_DEFAULTS.items() if k not in ("max_iters", "lr", "min_lr")},
    data_dir="data/cache/world", episodes_file="episodes_train.jsonl",
    out_dir="out/nano", phases="mem,smat,mrl",  # phase p writes out_dir/p/ckpt.pt
    seq_len=128,  # longest interaction
    length_buckets=1,  # >1: each batch comes from one of this many length ranges (every turn pads to its longest)
    chunks=True,  # each turn's rows in groups of similar length (data.loaders.length_chunks): no padding computed
    # curricula: lists of episode distances (turns from fact to probe), stepped through evenly over a phase
    mem_curriculum=[[1, 2, 4]], smat_curriculum=[[1, 2], [1, 2, 4], [1, 2, 4, 8]], mrl_curriculum=[[2], [4], [8], [16]],
    mem_iters=100, smat_iters=500, mrl_iters=200, mem_lr=1e-3, smat_lr=5e-4, mrl_lr=5e-5,
    mem_noise=0.05, mem_jitter=0.15,  # Gaussian noise on the STM input and the label; jitter of the label's ED share
    # In SMAT and MRL the decoder reads the memory the last write produced, with gradients, so every turn's loss
    # trains the write before it. *_detach_stm=True detaches the *input* of each write (one-step truncated BPTT):
    # turn t's loss trains the write of turn t-1 but not the earlier ones.
    smat_unfreeze_memory_at=0.0, smat_unfreeze_encoder_at=0.5,  # fractions of smat_iters
    smat_detach_stm=True, smat_aux_weight=0.01,
    mrl_detach_stm=True, mrl_max_answer=24, mrl_temperature=1.0, mrl_top_k=0, mrl_top_p=1.0,
    mrl_ppo_epochs=2, mrl_clip_eps=0.2, mrl_entropy_coef=0.01, mrl_value_coef=0.5, mrl_memory_reg=1e-4,
    mrl_kl_coef=0.05, mrl_bleu_weight=1.0, mrl_recall_weight=1.0, mrl_cosine_weight=0.0,
    mrl_reset_prob=0.2, mrl_reset_std=0.5,  # random STM resets: a rollout starts from noise of this std
    dmpo_curriculum=[[1, 2, 4]], dmpo_iters=200, dmpo_lr=1e-4, dmpo_beta=0.1, dmpo_detach_stm=False,
    dmpo_pairs={"binding": 1.0, "overwrite": 1.0, "other": 1.0, "own": 0.0},  # the rejected answers' mix
    dmpo_anchor=0.0, dmpo_neutral="I do not know.",  # anchored variant (APO): weight of |log pi/ref| of a neutral
)


RULES = dict(**{f"{p}_{k}": rule for p in PHASES for k, rule in (("curriculum", cli.CURRICULUM), (
    "iters", cli.at_least(1)), ("lr", cli.POSITIVE))}, mem_jitter=cli.between(0, 0.4),
    **{k: cli.between(0, 1) for k in ("smat_unfreeze_memory_at", "smat_unfreeze_encoder_at", "mrl_reset_prob")},
    **{k: cli.at_least(0) for k in ("mem_noise", "smat_aux_weight", "mrl_top_k", "mrl_entropy_coef",
       "mrl_value_coef", "mrl_memory_reg", "mrl_kl_coef", "mrl_bleu_weight", "mrl_recall_weight", "mrl_cosine_weight")},
    dmpo_beta=cli.POSITIVE, dmpo_anchor=cli.at_least(0), dmpo_pairs=((lambda v: isinstance(v, dict) and set(v) <= set(
        REJECTED_KINDS) and all(w >= 0 for w in v.values()) and sum(v.values()) > 0), f"weights of {REJECTED_KINDS}"),
    length_buckets=cli.at_least(1), mrl_max_answer=cli.at_least(1), mrl_ppo_epochs=cli.at_least(1),
    mrl_top_p=cli.between(0.01, 1), mrl_temperature=cli.POSITIVE, mrl_clip_eps=cli.POSITIVE, mrl_reset_std=cli.POSITIVE)


def episode_batch(cfg, pools, split, step, curriculum, g):
    """A batch of episodes of one distance (so all have the same number of turns) from the curriculum's entry for
    this step: its lists of distances are stepped through in equal parts of the phase."""
    distances = curriculum[min(len(curriculum) - 1, step * len(curriculum) // max(1, cfg["max_iters"]))]
    distances = [d for d in distances if d in pools[split]]  # main() checked them on the training split
    pool = pools[split][distances[torch.randint(len(distances), (1,), generator=g).item()]]
    w = max(cfg["batch_size"], len(pool) // cfg["length_buckets"])  # buckets: a window of the length-sorted pool
    lo = torch.randint(len(pool) - w + 1, (1,), generator=g).item() if w < len(pool) else 0
    return [pool[lo + i] for i in torch.randint(min(w, len(pool)), (cfg["batch_size"],), generator=g).tolist()]


# -----------------------------------------------------------------------------
# Stage 3: self-supervised memory-attention pre-training


def memory_pretrain_loss(model, turns, cfg, g):
    """-cos(STM_t, (1 - w) STM_{t-1} + w ED_t) averaged over the turns of the episodes (turns padded to S tokens:
    the label pairs token i with slot i)."""
    S = model.cfg.stm_size
    stm = model.new_memory(turns[0][0].size(0), generator=g)
    losses = []
    for t, (ids, attn_mask, _) in enumerate(turns):
        ids, attn_mask = ids[:, :S], attn_mask[:, :S]
        with torch.no_grad():
            ed = model.encode(ids, attn_mask)  # (L, B, S, D)
        noisy = stm + cfg["mem_noise"] * torch.randn(stm.shape, generator=g, device=stm.device)
        new = model.memory_attention(noisy, ed, attn_mask)
        jitter = cfg["mem_jitter"] * (2 * torch.rand(1, generator=g, device=stm.device).item() - 1)
        w = min(0.95, max(0.05, (0.9 if t == 0 else 0.5 - 0.05 * t) + jitter))  # the new data's share, shrinking
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
    """Answer-token CE summed over the episode: turn 1 read from a fresh memory, every later turn t from the STM
    that holds turns 1..t-1."""
    stm = model.new_memory(turns[0][0].size(0), generator=g)
    chunks = [length_chunks(attn_mask) if cfg["chunks"] else None for _, attn_mask, _ in turns]
    total, metrics = 0.0, {}
    for t, (ids, attn_mask, targets) in enumerate(turns):
        if t > 0:
            prev_ids, prev_mask, _ = turns[t - 1]
            stm = model.update_memory(stm.detach() if cfg["smat_detach_stm"] else stm, prev_ids, prev_mask,
                                      chunks[t - 1])
        logits, loss, aux_loss = model.decode(ids, stm, targets=targets, attn_mask=attn_mask, chunks=chunks[t],
                                              keep_logits=t == len(turns) - 1)  # the probe's, for its accuracy
        total = total + loss + cfg["smat_aux_weight"] * aux_loss
        if t == len(turns) - 1:  # the probe: teacher-forced accuracy of the recalled answer
            metrics.update(probe_loss=loss.detach(), probe_acc=token_accuracy(logits, targets))
    metrics.update(smat_loss=total.detach() / len(turns), tokens=sum(m.sum().item() for _, m, _ in turns))
    return total, metrics


def set_trainable(model, step, cfg):
    """Unfreeze schedule: decoder first, then memory attention, then encoder with the shared embedding."""
    n = cfg["max_iters"]
    groups = {"decoder": True, "memory_attention": step >= cfg["smat_unfreeze_memory_at"] * n,
              "encoder": step >= cfg["smat_unfreeze_encoder_at"] * n, "mlm_head": False}
    groups["embed"], groups["stm_init"] = groups["encoder"], groups["memory_attention"]  # stm_init: learned slots
    for name, p in model.named_parameters():
        p.requires_grad_(groups[name.split(".")[0]])


# -----------------------------------------------------------------------------
# The phases: each a plain function that trains one phase, top to bottom


def train_mem(cfg, model, tok, pools, device, ctx, rank, world):
    def get_batch(split, step, g):
        episodes = episode_batch(cfg, pools, split, step, cfg["mem_curriculum"], g)
        return episode_tensors(tok, episodes, cfg["seq_len"], device, pad_to=model.cfg.stm_size)

    return training.train(cfg, model, stage="mem", get_batch=get_batch,
                          loss_fn=lambda model, turns, step, g: memory_pretrain_loss(model, turns, cfg, g),
                          params=model.memory_attention.parameters(), device=device, ctx=ctx, rank=rank, world=world,
                          tokenizer=tok)


def train_smat(cfg, model, tok, pools, device, ctx, rank, world):
    def get_batch(split, step, g):
        return episode_tensors(tok, episode_batch(cfg, pools, split, step, cfg["smat_curriculum"], g), cfg["seq_len"],
                               device)

    def loss_fn(model, turns, step, g):
        set_trainable(model, step, cfg)
        return smat_loss(model, turns, cfg, g)

    params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")]
    return training.train(cfg, model, stage="smat", get_batch=get_batch, loss_fn=loss_fn, params=params,
                          device=device, ctx=ctx, rank=rank, world=world, tokenizer=tok)


def train_mrl(cfg, model, tok, pools, device, ctx, rank, world):
    critic = Critic(model).to(device)

    def get_batch(split, step, g):  # IMPO's batch: episodes played by the current policy
        episodes = episode_batch(cfg, pools, split, step, cfg["mrl_curriculum"], g)
        return rollout(model, episodes, tok, cfg, training.device_generator(g, device))

    params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")] + list(critic.parameters())
    return training.train(cfg, model, stage="mrl", get_batch=get_batch,
                          loss_fn=lambda model, play, step, g: impo_loss(model, critic, play, cfg), params=params,
                          device=device, ctx=ctx, rank=rank, world=world, tokenizer=tok,
                          extra_modules={"critic": critic}, batch_reuse=cfg["mrl_ppo_epochs"])


def train_dmpo(cfg, model, tok, pools, device, ctx, rank, world):
    if not cfg["init_from"]:
        raise cli.ConfigError("the dmpo phase needs init_from (or an earlier phase): its start is the reference")
    reference = training.init_model(cfg, tok, device).eval().requires_grad_(False)  # the phase's start, frozen

    def get_batch(split, step, g):  # episodes, each probe's rejected answer (and another value, for "own")
        episodes = episode_batch(cfg, pools, split, step, cfg["dmpo_curriculum"], g)
        values = [SLOTS[ep["slot"]]["values"] for ep in episodes]
        return {"episodes": episodes, "turns": episode_tensors(tok, episodes, cfg["seq_len"], device),
                "rejected": [rejected_answer(ep, cfg["dmpo_pairs"], v, g) for ep, v in zip(episodes, values)],
                "fallback": [rejected_answer(ep, {"other": 1}, v, g)[1] for ep, v in zip(episodes, values)]}

    params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")]
    return training.train(cfg, model, stage="dmpo", get_batch=get_batch, params=params, device=device, ctx=ctx,
                          loss_fn=lambda model, batch, step, g: dmpo_loss(model, reference, batch, cfg, tok, g),
                          rank=rank, world=world, tokenizer=tok)


TRAIN = {"mem": train_mem, "smat": train_smat, "mrl": train_mrl, "dmpo": train_dmpo}


def main(argv):
    cfg = cli.configure(DEFAULTS, argv)
    phases = [p for p in cfg["phases"].split(",") if p]
    if not phases or any(p not in PHASES for p in phases):
        raise cli.ConfigError(f"phases must be a comma-separated list of {', '.join(PHASES)}, got "
                              f"{cfg['phases']!r}")
    flagged = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}  # config files may set every phase
    unused = sorted(k for k in flagged if k.split("_")[0] in PHASES and k.split("_")[0] not in phases)
    if unused:
        raise cli.ConfigError(f"--{', --'.join(unused)} would change nothing: phases={cfg['phases']!r}")
    device, ctx, rank, world = training.setup(cfg, RULES)
    cli.require_files(cfg["data_dir"], ["tokenizer.tiktoken", cfg["episodes_file"]])
    tok = Tokenizer.from_file(os.path.join(cfg["data_dir"], "tokenizer.tiktoken"))
    episodes = read_jsonl(os.path.join(cfg["data_dir"], cfg["episodes_file"]))
    pools = episode_pools(episodes, max(1, len(episodes) // 50), by_length=cfg["length_buckets"] > 1)
    for phase in phases:
        missing = sorted({d for entry in cfg[f"{phase}_curriculum"] for d in entry} - set(pools["train"]))
        if missing or not all(set(entry) & set(pools["val"]) for entry in cfg[f"{phase}_curriculum"]):
            raise cli.ConfigError(f"{phase}_curriculum asks for distances {missing or 'absent from validation'}; "
                                  f"{cfg['episodes_file']} has {sorted(pools['train'])}")
    init_from, results = cfg["init_from"], {}
    for phase in phases:
        n = cfg[f"{phase}_iters"]
        pcfg = dict(cfg, init_from=init_from, out_dir=os.path.join(cfg["out_dir"], phase), max_iters=n,
                    lr=cfg[f"{phase}_lr"], min_lr=cfg[f"{phase}_lr"] / 10,
                    warmup_iters=min(cfg["warmup_iters"], max(1, n // 10)))  # a short phase still reaches its lr
        model = training.init_model(pcfg, tok, device)
        results[phase] = TRAIN[phase](pcfg, model, tok, pools, device, ctx, rank, world)
        init_from = os.path.join(pcfg["out_dir"], "ckpt.pt")
    return results


if __name__ == "__main__":
    cli.run(main)
