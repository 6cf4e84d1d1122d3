"""
The plumbing every training stage shares, so that each stage script shows only its stage: the settings every
stage has (TRAIN_DEFAULTS, checked with cli.py's rules), device / bf16 autocast / torchrun, AdamW with warmup +
cosine, checkpoints (self-contained, atomic, exact resume), and the training loop, written as a few small pieces
(start, update, evaluate, checkpoint, finish) that read in order.
"""

import contextlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

import cli
from model import ModelConfig, ReactiveTransformer, StatelessDecoder, get_config

TRAIN_RULES = dict(batch_size=cli.at_least(1), max_iters=cli.at_least(1), lr=cli.POSITIVE, min_lr=cli.at_least(0),
                   warmup_iters=cli.at_least(0), weight_decay=cli.at_least(0), grad_clip=cli.POSITIVE,
                   eval_interval=cli.at_least(1), eval_iters=cli.at_least(1), log_interval=cli.at_least(1),
                   seq_len=cli.at_least(8), seed=cli.at_least(0),
                   dtype=((lambda v: v in ("auto", "float32", "bfloat16")), "auto, float32 or bfloat16"),
                   model_args=((lambda v: isinstance(v, dict)), "a dict of ModelConfig fields"))


# -----------------------------------------------------------------------------
# Device, precision, distributed (torchrun)


def resolve_device(name):
    """'auto' -> 'cuda' when there is a GPU, else 'cpu'; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def setup(cfg, rules=None):
    """Check the settings (TRAIN_RULES for the keys cfg has, and the stage's own rules); then the device, autocast
    context and (rank, world_size) for this process; under torchrun also the process group."""
    cli.check(cfg, **{k: rule for k, rule in TRAIN_RULES.items() if k in cfg}, **(rules or {}))
    if "min_lr" in cfg and cfg["min_lr"] > cfg["lr"]:
        raise cli.ConfigError(f"min_lr={cfg['min_lr']} is above lr={cfg['lr']}: the schedule decays from lr to min_lr")
    cli.check_device(cfg["device"])
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    cfg["device"] = resolve_device(cfg["device"])
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if cfg["device"] == "cuda":
            cfg["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg["device"])
        dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ctx = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
           else contextlib.nullcontext())
    return device, ctx, rank, world


def generators(cfg, step, device, rank=0, split="train"):
    """(CPU generator for data, generator on `device` for masks and noise), seeded by the step: resuming at step k
    replays exactly what step k would have done. Every rank draws its own data."""
    seed = cfg["seed"] * 7919 + {"train": 0, "val": 1_000_003}[split] + step * 131 + rank
    g_cpu = torch.Generator().manual_seed(seed)
    return g_cpu, device_generator(g_cpu, device, seed)


def device_generator(g_cpu, device, seed=None):
    """A generator for sampling on `device`: g_cpu itself on the CPU, else one seeded from it."""
    if device.type == "cpu":
        return g_cpu
    seed = int(torch.randint(2**62, (1,), generator=g_cpu)) if seed is None else seed
    return torch.Generator(device).manual_seed(seed)


# -----------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(params, cfg, device):
    """AdamW; weight decay on matrices only (not norms, biases or gates); the fused kernel where PyTorch has one
    (CUDA and CPU), the default implementation elsewhere."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError) as e:  # a device (or dtype) without a fused kernel
        print(f"(no fused AdamW on {device.type}: {str(e)[:100]}; using the default AdamW)")
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.95))


def lr_at(step, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if step < cfg["warmup_iters"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_iters"]
    progress = min(1.0, (step - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


# -----------------------------------------------------------------------------
# Checkpoints: self-contained (model config + tokenizer), written atomically


def save_checkpoint(path, model, *, stage, step, cfg, tokenizer=None, optimizer=None, metrics=None, extra=None):
    """extra: {name: state_dict} of stage-only modules (e.g. the MRL critic)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ckpt = {
        "model": model.state_dict(),  # the plain module: compile() in place adds no _orig_mod. prefix
        "model_config": asdict(model.cfg),
        "model_kind": type(model).__name__,  # ReactiveTransformer, or the StatelessDecoder baseline
        "tokenizer": None if tokenizer is None else tokenizer.state(),  # {"ranks": ...} (+ a converted one's ids)
        "stage": stage,
        "step": step,
        "config": cfg,
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "metrics": metrics or {},
        "extra": extra or {},
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint under the real name


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or a CheckpointError that says what is wrong in one line."""
    if not os.path.isfile(path):
        raise cli.CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, ...
        first = (str(e).splitlines() or ["empty or cut short"])[0].split(". ")[0][:120]  # torch's first sentence
        raise cli.CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {first}): not a nanoRxT "
                              f"checkpoint, or a damaged one")
    missing = {"model", "model_config", "stage", "step"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise cli.CheckpointError(f"{path} is not a nanoRxT checkpoint (missing {sorted(missing)})")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint", device="cpu"):
    try:
        mcfg = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise cli.CheckpointError(f"{path}: bad model config: {e}")
    kinds = {"ReactiveTransformer": ReactiveTransformer, "StatelessDecoder": StatelessDecoder}
    kind = ckpt.get("model_kind", "ReactiveTransformer")
    if kind not in kinds:
        raise cli.CheckpointError(f"{path}: unknown model kind {kind!r}")
    model = kinds[kind](mcfg)
    load_weights(model, ckpt["model"], path)
    return model.to(device)


def load_weights(model, state, path="checkpoint"):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # wrong shapes or keys: name the first problem, not a wall of text
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise cli.CheckpointError(f"{path} does not fit this model: {lines[1] if len(lines) > 1 else lines[0]}"[:300])


def tokenizer_from_checkpoint(ckpt, path="checkpoint"):
    from data.tokenizer import Tokenizer
    if not ckpt.get("tokenizer"):
        raise cli.CheckpointError(f"{path} carries no tokenizer")
    return Tokenizer(**ckpt["tokenizer"])


def load_for_inference(path, device="cpu"):
    """(model in eval mode, tokenizer, checkpoint) of a trained checkpoint: what chat, evaluation and bench need."""
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, path, device).eval()
    return model, tokenizer_from_checkpoint(ckpt, path), ckpt


# -----------------------------------------------------------------------------
# The loop, in pieces


TRAIN_DEFAULTS = dict(
    preset="nano",  # model preset (model.PRESETS) when not starting from a checkpoint
    model_args={},  # ModelConfig fields to override, e.g. {'stm_size': 32}
    out_dir="out/run",
    init_from="",  # previous stage's ckpt.pt; "" = from scratch
    resume=True,  # continue this stage from out_dir/ckpt.pt if it is there
    device="auto",
    dtype="auto",  # bf16 autocast on CUDA, fp32 on CPU
    compile=False,
    seed=1337,
    batch_size=32,
    max_iters=1000,
    lr=1e-3,
    min_lr=1e-4,
    warmup_iters=50,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_interval=200,
    eval_iters=10,
    log_interval=20,
)


def init_model(cfg, tokenizer, device, kind=ReactiveTransformer):
    """A fresh model of cfg's preset (vocab from the tokenizer), or the previous stage's weights from init_from;
    either way refused when the stage's seq_len is longer than the model's context."""
    if cfg["init_from"]:
        model = model_from_checkpoint(load_checkpoint(cfg["init_from"], device), cfg["init_from"], device)
        if not isinstance(model, kind):
            raise cli.CheckpointError(f"{cfg['init_from']} holds a {type(model).__name__}, this stage trains a "
                                      f"{kind.__name__}")
        if model.cfg.vocab_size != tokenizer.vocab_size:
            raise cli.CheckpointError(f"{cfg['init_from']} has vocab {model.cfg.vocab_size}, tokenizer "
                                      f"{tokenizer.vocab_size}")
    else:
        try:
            mcfg = get_config(cfg["preset"], vocab_size=tokenizer.vocab_size, **cfg["model_args"])
        except (TypeError, ValueError) as e:
            raise cli.ConfigError(str(e))
        model = kind(mcfg).to(device)
    # the model's seq_len is the longest interaction chat and evaluate give it; a stage cutting its batches longer
    # would train on positions the model never meets in use, so a mismatched preset is refused here, not learned
    if cfg["seq_len"] > model.cfg.seq_len:
        raise cli.ConfigError(f"seq_len {cfg['seq_len']} is longer than the model's context {model.cfg.seq_len} "
                              f"(set model_args={{'seq_len': ...}} when it is created)")
    return model


def start(cfg, model, params, *, stage, device, rank=0, extra_modules=None):
    """The optimizer and the step to start at: 0, or where out_dir/ckpt.pt of this stage left off (weights, the
    optimizer and extra modules restored). Returns (optimizer, step, metrics)."""
    optimizer = make_optimizer(params, cfg, device)
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    step, metrics = 0, {}
    if cfg["resume"] and os.path.isfile(path):
        ckpt = load_checkpoint(path, device)
        if ckpt["stage"] == stage:
            load_weights(model, ckpt["model"], path)
            for name, module in (extra_modules or {}).items():
                module.load_state_dict(ckpt["extra"][name])
            if ckpt.get("optimizer"):
                optimizer.load_state_dict(ckpt["optimizer"])
            step, metrics = ckpt["step"], ckpt["metrics"]
            if rank == 0:
                print(f"resuming {stage} from {path} at step {step}")
    if cfg["compile"]:
        model.compile()
    model.train()
    return optimizer, step, metrics


def update(params, optimizer, loss, step, cfg, world=1):
    """One optimizer step at the scheduled learning rate: backward, average gradients across ranks, clip, AdamW.
    Returns (lr, gradient norm)."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:  # data parallelism by hand (one flat all-reduce): stages freeze parts mid-run
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg["grad_clip"])
    optimizer.step()
    return lr, grad_norm


def evaluate(model, cfg, get_batch, loss_fn, ctx, device, step):
    """Mean of each metric over eval_iters fixed validation batches (those of the curriculum at `step`)."""
    model.eval()
    totals = {}
    with torch.no_grad(), ctx:
        for i in range(cfg["eval_iters"]):
            g_cpu, g = generators(cfg, i, device, split="val")
            _, metrics = loss_fn(model, get_batch("val", step, g_cpu), step, g)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg["eval_iters"]
    model.train()
    return totals


def checkpoint(cfg, model, optimizer, *, stage, step, metrics, tokenizer=None, rank=0, extra_modules=None):
    if rank == 0:
        save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), model, stage=stage, step=step, cfg=cfg,
                        tokenizer=tokenizer, optimizer=optimizer, metrics=metrics,
                        extra={name: m.state_dict() for name, m in (extra_modules or {}).items()})


def show(metrics):
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "tokens")


def check_ranks_agree(params, stage, world, rank):
    """Data parallelism is only correct if every rank ends with the same weights: compare checksums."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if not all(torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"[{stage}] ranks disagree on the weights: {[s.item() for s in sums]}")
    if rank == 0:
        print(f"[{stage}] all {world} ranks agree on the weights (checksum {sums[0].item():.6f})")


def train(cfg, model, *, stage, get_batch, loss_fn, params, device, ctx, rank=0, world=1, tokenizer=None,
          extra_modules=None, batch_reuse=1):
    """Train with batch = get_batch(split, step, cpu_generator) and (loss, metrics) = loss_fn(model, batch, step,
    generator); eval every eval_interval steps and at the end; checkpoint after each eval; resume from out_dir.
    batch_reuse > 1 takes that many optimizer steps on each batch (PPO's epochs: IMPO's batch is a rollout).
    Returns the final metrics (with tokens_per_s and seconds)."""
    params = list(params)
    optimizer, step, metrics = start(cfg, model, params, stage=stage, device=device, rank=rank,
                                     extra_modules=extra_modules)
    if step >= cfg["max_iters"]:
        if rank == 0:
            print(f"[{stage}] already finished ({step} steps): nothing to do")
        return metrics
    t0, tokens, batch = time.time(), 0, None
    bar = cli.progress(range(step, cfg["max_iters"]), desc=stage, disable=rank != 0, initial=step,
                       total=cfg["max_iters"])
    for step in bar:
        g_cpu, g = generators(cfg, step, device, rank)
        if batch is None or step % batch_reuse == 0:
            batch = get_batch("train", step, g_cpu)
        with ctx:
            loss, m = loss_fn(model, batch, step, g)
        lr, grad_norm = update(params, optimizer, loss, step, cfg, world)
        tokens += int(m.get("tokens", 0))
        if step % cfg["log_interval"] == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm.item():.2f}")
        if (step + 1) % cfg["eval_interval"] == 0 or step + 1 == cfg["max_iters"]:
            metrics = dict(evaluate(model, cfg, get_batch, loss_fn, ctx, device, step), train_loss=loss.item())
            if rank == 0:
                bar.write(f"[{stage}] step {step + 1}/{cfg['max_iters']}  lr {lr:.2e}  {show(metrics)}")
            if step + 1 < cfg["max_iters"]:  # the final checkpoint follows, with the run's timing in its metrics
                checkpoint(cfg, model, optimizer, stage=stage, step=step + 1, metrics=metrics, tokenizer=tokenizer,
                           rank=rank, extra_modules=extra_modules)
    return finish(cfg, model, optimizer, params, stage=stage, metrics=metrics, seconds=time.time() - t0,
                  tokens=tokens, tokenizer=tokenizer, rank=rank, world=world, extra_modules=extra_modules)


def finish(cfg, model, optimizer, params, *, stage, metrics, seconds, tokens=0, tokenizer=None, rank=0, world=1,
           extra_modules=None):
    """The last checkpoint, with throughput and wall time in its metrics, and a summary line."""
    if world > 1:
        check_ranks_agree(params, stage, world, rank)
    if tokens:
        metrics["tokens_per_s"] = tokens * world / max(seconds, 1e-9)
    metrics["seconds"] = seconds
    checkpoint(cfg, model, optimizer, stage=stage, step=cfg["max_iters"], metrics=metrics, tokenizer=tokenizer,
               rank=rank, extra_modules=extra_modules)
    if rank == 0:
        print(f"[{stage}] done: {cfg['max_iters']} steps in {seconds:.1f}s  {show(metrics)}  -> "
              f"{os.path.join(cfg['out_dir'], 'ckpt.pt')}")
    return metrics
