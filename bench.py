"""
Benchmarks: what RxT's fixed-size memory buys, and what Sparse Query Attention buys.

  conversation  RxT and the stateless baseline (same ModelConfig) hold an N-turn conversation of 32-token queries
                and 32-token greedy answers: per turn prefill (time to first token), generation, RxT's memory update
                (off the user's path, reported apart) and tokens processed
  attention     model.Attention as MHA, GQA, MQA, SQA, sSQA, xSQA at the same D and H: causal self-attention with
                RoPE, forward and forward+backward at long sequence lengths, speed-up over MHA, FLOPs of the scores
  training      tokens/s of a joint training step (MLM + decoder reading the ED, backward, AdamW) for nano and micro, and
                the achieved FLOP/s against a plain matmul measured in the same run (MFU on GPU)
  memory        the state each model carries into turn N (RxT: the STM; baseline: the KV cache of the whole history)
                and the peak memory of a long conversation
  smat          episodes/s of a SMAT step (the demo's config and the memory world's episodes, nano) with every turn
                padded and with its rows in length chunks, side by side, and the share of computed positions that
                are real tokens in each curriculum phase (needs the world: python -m data.memory_world)

    python bench.py                                    # everything, micro preset (about 4 minutes on 2 CPU cores)
    python bench.py --quick                            # tiny sizes, a few seconds (the smoke test)
    python bench.py --sections=attention --seq_lens=1024,8192
    python bench.py --device=cuda --turns=128

Prints tables and a summary line; writes --out (JSON) and, when matplotlib is installed, a PNG next to it.
Timings are medians of repeated runs after a warm-up (time.perf_counter, synchronised on CUDA).
Random token ids stand in for text: no tokenizer is needed and answers are forced to exactly 32 tokens.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import engine
import model as M
import cli
import training

SECTIONS = ("conversation", "attention", "training", "memory", "smat")
QUERY_LEN, ANSWER_LEN = 32, 32
# bf16 dense peak FLOP/s of a few GPUs (datasheets) for MFU; elsewhere the measured matmul is the reference
PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few turns, short lengths (seconds)")
    p.add_argument("--preset", default="micro", choices=sorted(M.PRESETS), help="model of the conversation")
    p.add_argument("--ckpt", default="", help="a trained RxT checkpoint for the conversation (instead of --preset)")
    p.add_argument("--baseline_ckpt", default="", help="a trained stateless baseline for the conversation")
    p.add_argument("--turns", type=int, default=None, help="conversation length (default 32 on CPU, 128 on CUDA)")
    p.add_argument("--seq_lens", default=None, help="attention lengths, e.g. 1024,2048,4096,8192")
    p.add_argument("--attn_dim", type=int, default=512, help="D of the attention benchmark")
    p.add_argument("--attn_heads", type=int, default=16, help="H of the attention benchmark (hd = D / H)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--sections", default="", help="comma-separated subset of " + ",".join(SECTIONS) + " (default: "
                   "all; smat only where the world is built)")
    p.add_argument("--out", default="out/bench/bench.json", help="JSON results (a PNG plot is written next to it)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data_dir", default="data/cache/world", help="the memory world, for the smat section")
    args = p.parse_args(argv)
    world = os.path.isfile(os.path.join(args.data_dir, "episodes_train.jsonl"))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()] or [
        s for s in SECTIONS if s != "smat" or world]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    cli.check_device(args.device)
    cuda = args.device.startswith("cuda")
    if args.quick:  # everything tiny: the smoke test runs this in a few seconds
        args.preset = "nano"
        args.turns = 3 if args.turns is None else args.turns
        args.seq_lens = args.seq_lens or "64,128"
        args.attn_dim, args.attn_heads = 64, 8
        args.repeats = 1 if args.repeats is None else args.repeats
    args.turns = (128 if cuda else 32) if args.turns is None else args.turns
    try:
        args.seq_lens = [int(t) for t in (args.seq_lens or ("1024,2048,4096,8192,16384,32768" if cuda
                                                            else "1024,2048,4096,8192")).split(",")]
    except ValueError:
        p.error(f"--seq_lens must be comma-separated integers, got {args.seq_lens!r}")
    args.repeats = 5 if args.repeats is None else args.repeats
    cli.check(vars(args), turns=cli.at_least(2), repeats=cli.at_least(1),
              threads=((lambda v: v is None or v >= 1), "at least 1"),
              seq_lens=((lambda v: all(t >= 8 for t in v)), "lengths of at least 8 tokens"),
              attn_heads=cli.at_least(4),  # xSQA has H/4 query heads
              attn_dim=((lambda d: d % args.attn_heads == 0 and (d // args.attn_heads) % 2 == 0),
                        "a multiple of attn_heads with an even head size"))
    for path in (args.ckpt, args.baseline_ckpt):
        if path and not os.path.isfile(path):
            raise cli.CheckpointError(f"checkpoint not found: {path}")
    return args


# -----------------------------------------------------------------------------
# Timing, memory and printing helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1):
    """Median wall time (s) of fn() over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the whole process's (ru_maxrss)


def peak_memory(device):
    """Peak bytes since reset_peak_memory: the CUDA allocator's peak, or the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return max_rss()


def max_rss():
    """Peak resident set size of the whole process in bytes (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def print_table(title, header, rows):
    """Right-aligned columns under a title; rows hold already formatted strings."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def ms(seconds):
    return f"{seconds * 1e3:.1f}"


def mib(n_bytes):
    return f"{n_bytes / 2**20:.2f}"


# -----------------------------------------------------------------------------
# 1. Conversation cost: RxT (constant per turn) vs the stateless baseline (re-reads the history every turn)


def rxt_turn(model, stm, query, device):
    """One RxT event: answer reading STM_{t-1} (prefill = up to the first token), then write the turn into memory."""
    sync(device)
    t0 = time.perf_counter()
    tokens = engine.interact(model, query, stm, temperature=0, max_new_tokens=ANSWER_LEN)  # no eos_id: 32 tokens
    answer = [next(tokens)]
    sync(device)
    t1 = time.perf_counter()
    answer += list(tokens)
    t2 = time.perf_counter()  # interact yields Python ints: already synchronised
    interaction = torch.cat([query, torch.tensor(answer, device=device)])[None]  # (1, 64)
    stm = model.update_memory(stm, interaction)  # off the user's path (chat.py runs it in a background thread)
    sync(device)
    t3 = time.perf_counter()
    return stm, dict(prefill=t1 - t0, generation=t2 - t1, update=t3 - t2,
                     tokens=query.numel() + len(answer) + interaction.size(1))


def baseline_turn(model, history, query, device):
    """One stateless turn: the whole history plus the new query is the prompt, then 32 tokens with the KV cache."""
    ids = torch.cat(history + [query])[None]  # (1, T_hist + 32): re-read every turn
    sync(device)
    t0 = time.perf_counter()
    tokens = engine.stream(model.decoder, model.embed, ids, None, None, max_new_tokens=ANSWER_LEN, temperature=0)
    answer = [next(tokens)]
    sync(device)
    t1 = time.perf_counter()
    answer += list(tokens)
    sync(device)
    t2 = time.perf_counter()
    history += [query, torch.cat(answer)]
    return dict(prefill=t1 - t0, generation=t2 - t1, update=0.0, tokens=ids.size(1) + len(answer))


def decode_ops(name, model, query, device, amp):
    """ATen ops per generated token at turn 1 (after the prompt), counted by torch.profiler: how much of a token's
    time is dispatch rather than arithmetic."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), amp:
        if name == "rxt":
            tokens = engine.interact(model, query, model.new_memory(1), temperature=0, max_new_tokens=ANSWER_LEN)
        else:
            tokens = engine.stream(model.decoder, model.embed, query[None], None, None, max_new_tokens=ANSWER_LEN,
                                   temperature=0)
        next(tokens)  # the prompt
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            n = sum(1 for _ in tokens)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / n


def run_conversation(name, model, queries, device, amp):
    """One conversation over all queries; per-turn timings and the peak memory while it ran."""
    reset_peak_memory(device)
    stm = model.new_memory(1) if name == "rxt" else None
    history, turns = [], []
    with torch.inference_mode(), amp:
        for q in queries:
            if name == "rxt":
                stm, t = rxt_turn(model, stm, q, device)
            else:
                t = baseline_turn(model, history, q, device)
            turns.append(t)
    return turns, peak_memory(device)


def conversation_models(args, device):
    """RxT and the baseline: trained checkpoints when given, else random weights of the preset (the cost is the same)."""
    cfg = M.get_config(args.preset)
    torch.manual_seed(args.seed)
    models = {"rxt": M.ReactiveTransformer(cfg), "baseline": M.StatelessDecoder(cfg)}
    for name, path in (("rxt", args.ckpt), ("baseline", args.baseline_ckpt)):
        if path:
            models[name] = training.load_for_inference(path, device)[0]
            if not isinstance(models[name], (M.ReactiveTransformer if name == "rxt" else M.StatelessDecoder)):
                raise cli.CheckpointError(f"{path} is not a {'RxT' if name == 'rxt' else 'stateless baseline'} model")
    return {name: m.to(device).eval() for name, m in models.items()}


def bench_conversation(args, device, amp, quiet=False):
    models = conversation_models(args, device)
    V = min(m.cfg.vocab_size for m in models.values())
    g = torch.Generator().manual_seed(args.seed)
    # real text is not needed for a cost: random ids, answers forced to exactly ANSWER_LEN tokens (no [EOS] stop)
    queries = [torch.randint(V, (QUERY_LEN,), generator=g).to(device) for _ in range(args.turns)]
    result = {"preset": args.ckpt or args.preset, "baseline_model": args.baseline_ckpt or args.preset,
              "turns": args.turns, "query_len": QUERY_LEN, "answer_len": ANSWER_LEN, "repeats": args.repeats}
    for name, model in models.items():
        run_conversation(name, model, queries[:2], device, amp)  # warm-up
        runs, peaks = [], []
        for _ in range(args.repeats):
            turns, peak = run_conversation(name, model, queries, device, amp)
            runs.append(turns)
            peaks.append(peak)
        per_turn = []  # median over the repeats, turn by turn
        for i in range(args.turns):
            t = {k: statistics.median(run[i][k] for run in runs) for k in ("prefill", "generation", "update")}
            t["user"] = t["prefill"] + t["generation"]
            t["tokens"] = runs[0][i]["tokens"]
            per_turn.append(t)
        result[name] = {"per_turn": per_turn, "peak_memory_bytes": max(peaks),
                        "turn_n_over_turn_1": per_turn[-1]["user"] / per_turn[0]["user"],
                        "prefill_turn_n_over_turn_1": per_turn[-1]["prefill"] / per_turn[0]["prefill"],
                        "total_user_s": sum(t["user"] for t in per_turn),
                        "total_with_update_s": sum(t["user"] + t["update"] for t in per_turn),
                        "tokens_processed": sum(t["tokens"] for t in per_turn)}
    rxt, base = result["rxt"], result["baseline"]
    result["total_user_baseline_over_rxt"] = base["total_user_s"] / rxt["total_user_s"]
    # RxT's speed at batch 1: tokens after the first come from generation; a full turn includes the update
    decode = [(ANSWER_LEN - 1) / t["generation"] for t in rxt["per_turn"]]
    full = [t["user"] + t["update"] for t in rxt["per_turn"]]
    result["rxt_decode_tokens_per_s"] = statistics.median(decode)
    result["rxt_full_turn_s"] = statistics.median(full)
    for name in ("rxt", "baseline"):  # one generated token: its time (median over the turns) and its ATen ops
        result[name]["decode_token_s"] = statistics.median(t["generation"] / (ANSWER_LEN - 1)
                                                            for t in result[name]["per_turn"])
        result[name]["aten_ops_per_token"] = decode_ops(name, models[name], queries[0], device, amp)
    if quiet:
        return result

    rows, N = [], args.turns
    shown = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, N} & set(range(1, N + 1)))
    for n in shown:
        r, b = rxt["per_turn"][n - 1], base["per_turn"][n - 1]
        rows.append([n, ms(r["prefill"]), ms(r["generation"]), ms(r["update"]), ms(r["user"]), r["tokens"],
                     ms(b["prefill"]), ms(b["generation"]), ms(b["user"]), b["tokens"]])
    rxt_name, base_name = args.ckpt or args.preset, args.baseline_ckpt or args.preset
    names = rxt_name if rxt_name == base_name else f"{rxt_name} vs {base_name}"
    print_table(f"1. Conversation cost: {names}, {QUERY_LEN}-token queries, {ANSWER_LEN}-token greedy answers "
                f"(ms, median of {args.repeats}; user = prefill + generation; RxT's update is off the user's path)",
                ["turn", "RxT prefill", "gen", "update", "user", "tokens", "base prefill", "gen", "user", "tokens"],
                rows)
    print_table(f"   summary over {N} turns (decode: one generated token at batch 1, median over the turns; ATen "
                f"ops counted at turn 1)",
                ["model", f"turn-{N}/turn-1 user", f"turn-{N}/turn-1 prefill", "total user s", "total+update s",
                 "tokens processed", "decode ms/token", "ATen ops/token"],
                [[n, f"{r['turn_n_over_turn_1']:.2f}x", f"{r['prefill_turn_n_over_turn_1']:.2f}x",
                  f"{r['total_user_s']:.2f}", f"{r['total_with_update_s']:.2f}", r["tokens_processed"],
                  f"{r['decode_token_s'] * 1e3:.2f}", f"{r['aten_ops_per_token']:.0f}"]
                 for n, r in (("RxT", rxt), ("baseline", base))])
    print(f"   baseline / RxT total user-facing time: {result['total_user_baseline_over_rxt']:.2f}x;  "
          f"RxT at batch 1: {result['rxt_decode_tokens_per_s']:.0f} generated tokens/s, full turn "
          f"(prefill + {ANSWER_LEN} tokens + update) {ms(result['rxt_full_turn_s'])} ms")
    return result


# -----------------------------------------------------------------------------
# 2. The attention family at the same D and H: fewer query heads (SQA) cut the score FLOPs, fewer kv heads do not


def attention_variants(H):
    """(Hq, Hkv) of each member of the family at H heads: sSQA is Hq = Hkv = H/2, xSQA Hq = Hkv = H/4."""
    return {"MHA": (H, H), "GQA": (H, max(1, H // 4)), "MQA": (H, 1), "SQA": (H // 2, max(1, H // 4)),
            "sSQA": (H // 2, H // 2), "xSQA": (H // 4, H // 4)}


def score_flops(B, Hq, T, hd):
    """FLOPs of QK^T and AV: 2 matmuls * 2 FLOPs per MAC * B*Hq*T^2*hd, halved because causal kernels skip the
    upper triangle."""
    return 2 * 2 * B * Hq * T * T * hd // 2


def bench_attention(args, device, amp):
    D, H = args.attn_dim, args.attn_heads
    hd, variants = D // H, attention_variants(H)
    repeats = min(args.repeats, 3)
    result = {"d_model": D, "n_heads": H, "head_dim": hd, "batch": 1, "seq_lens": args.seq_lens, "variants": {},
              "causal_score_gflops_note": "2*2*B*Hq*T^2*hd / 2 (causal)"}
    torch.manual_seed(args.seed)
    layers = {name: M.Attention(D, H, Hq, Hkv).to(device) for name, (Hq, Hkv) in variants.items()}
    for name, (Hq, Hkv) in variants.items():
        result["variants"][name] = {"n_q_heads": Hq, "n_kv_heads": Hkv, "theory_score_speedup": H / Hq,
                                    "params": M.count_params(layers[name]), "by_len": {}}
    rows = []
    for T in args.seq_lens:
        x = torch.randn(1, T, D, device=device)
        cs = M.rope(torch.arange(T, device=device), hd, 10000.0)
        for name, attn in layers.items():
            def forward():
                with torch.inference_mode(), amp:
                    attn(x, q_rope=cs, k_rope=cs, is_causal=True)

            def forward_backward():
                attn.zero_grad(set_to_none=True)
                xg = x.detach().requires_grad_()
                with amp:
                    y = attn(xg, q_rope=cs, k_rope=cs, is_causal=True)
                y.float().square().mean().backward()

            r = result["variants"][name]
            r["by_len"][T] = {"forward_s": timed(forward, device, repeats),
                              "forward_backward_s": timed(forward_backward, device, repeats),
                              "score_gflops": score_flops(1, r["n_q_heads"], T, hd) / 1e9}
        mha = result["variants"]["MHA"]["by_len"][T]
        for name, r in result["variants"].items():
            m = r["by_len"][T]
            m["forward_speedup"] = mha["forward_s"] / m["forward_s"]
            m["forward_backward_speedup"] = mha["forward_backward_s"] / m["forward_backward_s"]
            rows.append([T, name, r["n_q_heads"], r["n_kv_heads"], ms(m["forward_s"]), f"{m['forward_speedup']:.2f}x",
                         ms(m["forward_backward_s"]), f"{m['forward_backward_speedup']:.2f}x",
                         f"{r['theory_score_speedup']:.0f}x", f"{m['score_gflops']:.2f}",
                         f"{m['score_gflops'] / m['forward_s']:.0f}"])
    print_table(f"2. Attention variants: causal self-attention with RoPE, D={D}, H={H} (hd={hd}), batch 1 "
                f"(ms, median of {repeats}; speed-up over MHA; theory = H/Hq for the scores)",
                ["T", "variant", "Hq", "Hkv", "fwd ms", "fwd x", "fwd+bwd ms", "fwd+bwd x", "theory", "score GFLOP",
                 "score GFLOP/s"], rows)

    # is F.scaled_dot_product_attention(enable_gqa=True) efficient here, or should K/V be repeated per query head?
    T, rows, result["sdpa_grouped_kv"] = args.seq_lens[-1], [], {}
    for name, (Hq, Hkv) in variants.items():
        if Hq == Hkv:
            continue
        q = torch.randn(1, Hq, T, hd, device=device)
        k, v = torch.randn(2, 1, Hkv, T, hd, device=device)
        with torch.inference_mode(), amp:
            t_gqa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                          device, repeats)
            t_rep = timed(lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, dim=1),
                                                                   v.repeat_interleave(Hq // Hkv, dim=1),
                                                                   is_causal=True), device, repeats)
        result["sdpa_grouped_kv"][name] = {"seq_len": T, "enable_gqa_s": t_gqa, "repeat_interleave_s": t_rep}
        rows.append([name, Hq, Hkv, ms(t_gqa), ms(t_rep), f"{t_rep / t_gqa:.2f}x"])
    print_table(f"   SDPA alone with grouped K/V at T={T}: enable_gqa=True vs repeat_interleave of K/V (ms)",
                ["variant", "Hq", "Hkv", "enable_gqa", "repeat_interleave", "repeat / gqa"], rows)
    return result


# -----------------------------------------------------------------------------
# 3. Training throughput of a joint LM step (stage 1: encoder MLM + decoder AR reading the detached ED)


def matmul_flops_per_s(device, dtype, n=2048, repeats=5):
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats, warmup=2)


def bench_training(args, device, amp):
    from data.loaders import mlm_inputs, next_token_targets

    if args.quick:
        shapes = {"nano": (2, 32)}
    else:
        shapes = {"nano": (8, 128), "micro": (8, 256)}
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    cuda = device.type == "cuda"
    result = {"flops_formula": "6 * N * tokens, N = encoder + active decoder parameters - 2 * embedding "
                               "(lookups, not matmuls; the LM head counts); attention scores and MLM head left out",
              "matmul_fp32_flops_per_s": matmul_flops_per_s(device, torch.float32), "presets": {}}
    if cuda:
        result["matmul_bf16_flops_per_s"] = matmul_flops_per_s(device, torch.bfloat16)
    reference = result["matmul_bf16_flops_per_s"] if cuda else result["matmul_fp32_flops_per_s"]
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    rows = []
    for preset, (B, T) in shapes.items():
        cfg = M.get_config(preset)
        torch.manual_seed(args.seed)
        model = M.ReactiveTransformer(cfg).to(device).train()
        # as train_joint.py: the memory attention network is not trained in this stage
        params = [p for n, p in model.named_parameters() if not n.startswith("memory_attention.")]
        opt = training.make_optimizer(params, dict(lr=1e-4, weight_decay=0.1), device)  # what the stages use
        g = torch.Generator(device=device).manual_seed(args.seed)
        ids = torch.randint(cfg.vocab_size, (B, T), device=device, generator=g)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask_id = cfg.vocab_size - 1  # any id will do for timing

        targets = next_token_targets(ids, mask)

        def step():  # stage 1's step: MLM on a masked copy, the decoder reads the detached ED plus noise
            with amp:
                masked, mlm_targets = mlm_inputs(ids, mask, mask_id, 0.15, g)
                ed, mlm_loss, _ = model.mlm(masked, mask, mlm_targets)
                memory = ed.detach() + 0.15 * torch.randn(ed.shape, generator=g, device=device)
                _, ar_loss, aux_loss = model.decode(ids, memory, mask, targets)
                loss = ar_loss + mlm_loss + 0.01 * aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        dt = timed(step, device, repeats, warmup=2)
        counts = model.param_counts()
        n_active = counts["encoder"] + counts["decoder_active"] - 2 * M.count_params(model.embed)
        flops_per_s = 6 * n_active * B * T / dt
        r = {"batch": B, "seq_len": T, "step_s": dt, "tokens_per_s": B * T / dt, "active_matmul_params": n_active,
             "flops_per_s": flops_per_s, "fraction_of_matmul": flops_per_s / reference}
        if peak:
            r["mfu"] = flops_per_s / peak
        result["presets"][preset] = r
        rows.append([preset, f"{B} x {T}", ms(dt), f"{r['tokens_per_s']:.0f}", f"{n_active / 1e6:.2f}M",
                     f"{flops_per_s / 1e9:.1f}", f"{100 * r['fraction_of_matmul']:.0f}%"]
                    + ([f"{100 * r['mfu']:.1f}%"] if peak else []))
    ref_name = "bf16" if cuda else "fp32"
    print_table(f"3. Training throughput: joint step (MLM + AR on the ED + backward + AdamW), "
                f"{'bf16 autocast' if cuda else 'fp32'}; FLOPs = {result['flops_formula']}",
                ["preset", "B x T", "step ms", "tokens/s", "N active", "GFLOP/s", f"of {ref_name} matmul"]
                + (["MFU"] if peak else []), rows)
    print(f"   plain 2048x2048 matmul: {result['matmul_fp32_flops_per_s'] / 1e9:.1f} GFLOP/s fp32"
          + (f", {result['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s bf16" if cuda else ""))
    return result


# -----------------------------------------------------------------------------
# 4. Memory footprint: RxT carries a fixed-size STM, the baseline a KV cache that grows with the history


def bench_memory(args, device, amp, conversation):
    cfg = training.load_for_inference(args.ckpt)[0].cfg if args.ckpt else M.get_config(args.preset)
    L, Hkv, hd, S, D = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.stm_size, cfg.d_model
    probe = M.Attention(D, cfg.n_heads, cfg.n_q_heads, Hkv).to(device)
    with torch.inference_mode(), amp:
        kv_bytes = probe.qkv_proj(torch.zeros(1, 1, D, device=device)).element_size()  # cache dtype (bf16 under amp)
    stm_bytes = L * S * D * 4  # fp32 state, batch 1
    per_turn_tokens = QUERY_LEN + ANSWER_LEN
    rxt_turn_cache = 2 * L * Hkv * hd * (per_turn_tokens + S) * kv_bytes  # this turn's self-attn KV + the STM's K/V
    rows, by_turn = [], {}
    for n in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, args.turns} & set(range(1, args.turns + 1))):
        history = (n - 1) * per_turn_tokens
        base = 2 * L * Hkv * hd * history * kv_bytes
        by_turn[n] = {"history_tokens": history, "rxt_stm_bytes": stm_bytes, "baseline_kv_bytes": base}
        rows.append([n, history, mib(stm_bytes), mib(rxt_turn_cache), mib(base), f"{base / stm_bytes:.2f}"])
    print_table(f"4. Memory footprint carried into turn N: {args.preset}, batch 1 (MiB; baseline KV = "
                f"2*L*Hkv*hd*T_hist*{kv_bytes} bytes)",
                ["turn", "history tokens", "RxT STM", "RxT per-turn caches", "baseline KV", "baseline / STM"], rows)
    peak_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    peaks = {name: conversation[name]["peak_memory_bytes"] for name in ("rxt", "baseline")}
    print(f"   {peak_kind} during a {args.turns}-turn conversation: RxT {mib(peaks['rxt'])} MiB, "
          f"baseline {mib(peaks['baseline'])} MiB;  ru_maxrss of this process: {mib(max_rss())} MiB")
    return {"stm_bytes": stm_bytes, "rxt_per_turn_cache_bytes": rxt_turn_cache, "kv_bytes_per_element": kv_bytes,
            "by_turn": by_turn, "peak_memory_kind": peak_kind, "peak_memory_bytes": peaks, "ru_maxrss_bytes": max_rss()}


# -----------------------------------------------------------------------------
# 5. SMAT: a memory-aware training step on the world's episodes, every turn padded vs its rows in length chunks


def bench_smat(args, device, amp):
    import train_mrl
    from data.loaders import computed_positions, episode_pools, episode_tensors, length_chunks
    from data.memory_world import read_jsonl
    from data.tokenizer import Tokenizer

    cli.require_files(args.data_dir, ["tokenizer.tiktoken", "episodes_train.jsonl"])
    tok = Tokenizer.from_file(os.path.join(args.data_dir, "tokenizer.tiktoken"))
    episodes = read_jsonl(os.path.join(args.data_dir, "episodes_train.jsonl"))
    pools = episode_pools(episodes, len(episodes) // 50)
    cfg = cli.configure(train_mrl.DEFAULTS, ["config/nano_mrl.py"])  # the demo's SMAT: batch, curriculum, BPTT
    phases = cfg["smat_curriculum"]
    cfg.update(max_iters=len(phases), batch_size=8 if args.quick else cfg["batch_size"])
    n_batches = 2 if args.quick else 50
    share = {}
    for i, phase in enumerate(phases):  # real tokens / computed positions over n_batches batches of each phase
        real, padded, chunked = 0, 0, 0
        for b in range(n_batches):
            batch = train_mrl.episode_batch(cfg, pools, "train", i, phases, torch.Generator().manual_seed(b))
            for _, mask, _ in episode_tensors(tok, batch, cfg["seq_len"], "cpu"):
                real += mask.sum().item()
                padded += computed_positions(mask, None)
                chunked += computed_positions(mask, length_chunks(mask))
        share[str(phase)] = {"padded": real / padded, "chunks": real / chunked}
    torch.manual_seed(args.seed)
    model = M.ReactiveTransformer(M.get_config("nano", vocab_size=tok.vocab_size)).to(device).train()
    params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")]
    opt = training.make_optimizer(params, dict(lr=1e-4, weight_decay=0.1), device)
    batch = episode_tensors(tok, train_mrl.episode_batch(cfg, pools, "train", len(phases) - 1, phases,
                                                         torch.Generator().manual_seed(args.seed)), cfg["seq_len"],
                            device)  # the longest phase

    def step(chunks):
        with amp:
            loss, _ = train_mrl.smat_loss(model, batch, dict(cfg, chunks=chunks), torch.Generator(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {True: [], False: []}
    for _ in range(max(1, args.repeats)):  # alternating, so that both see the same machine
        for chunks in (False, True):
            times[chunks].append(timed(lambda: step(chunks), device, 1, warmup=0 if times[chunks] else 1))
    padded, chunked = statistics.median(times[False]), statistics.median(times[True])
    B = cfg["batch_size"]
    result = {"batch": B, "phase": phases[-1], "padded_step_s": padded, "chunks_step_s": chunked,
              "padded_episodes_per_s": B / padded, "chunks_episodes_per_s": B / chunked, "speedup": padded / chunked,
              "real_share": share}
    print_table(f"5. SMAT step (nano, batch {B}, config/nano_mrl.py, phase {phases[-1]}, whole-episode BPTT): "
                f"padded vs rows in length chunks", ["", "step ms", "episodes/s"],
                [["padded", ms(padded), f"{B / padded:.1f}"], ["chunks", ms(chunked), f"{B / chunked:.1f}"]])
    print_table("   real tokens / computed positions per curriculum phase", ["phase", "padded", "chunks"],
                [[p, f"{s['padded']:.2f}", f"{s['chunks']:.2f}"] for p, s in share.items()])
    return result


# -----------------------------------------------------------------------------
# Plot (optional) and main


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib for one)")
        return None
    conv, attn = results.get("conversation"), results.get("attention")
    panels = [p for p in (conv, attn) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    ax = iter(axes[0])
    if conv:
        a = next(ax)
        for name, label in (("rxt", "RxT"), ("baseline", "stateless baseline")):
            turns = range(1, len(conv[name]["per_turn"]) + 1)
            a.plot(turns, [t["user"] * 1e3 for t in conv[name]["per_turn"]], marker=".", label=label)
        a.set(xlabel="turn", ylabel="user-facing latency (ms)", title=f"{conv['preset']}: latency per turn")
        a.legend()
    if attn:
        a = next(ax)
        for name, r in attn["variants"].items():
            a.plot(attn["seq_lens"], [r["by_len"][T]["forward_speedup"] for T in attn["seq_lens"]], marker=".",
                   label=name)
        a.set(xscale="log", xlabel="sequence length", ylabel="forward speed-up over MHA",
              title=f"attention, D={attn['d_model']} H={attn['n_heads']}")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # bf16 autocast on CUDA (as training does), plain fp32 on CPU
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick}
    print(f"nanoRxT bench: {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}")
    results = {"env": env, "args": {k: v for k, v in vars(args).items()}}
    t_start = time.perf_counter()
    if "conversation" in args.sections:
        results["conversation"] = bench_conversation(args, device, amp)
    if "attention" in args.sections:
        results["attention"] = bench_attention(args, device, amp)
    if "training" in args.sections:
        results["training"] = bench_training(args, device, amp)
    if "memory" in args.sections:
        conversation = results.get("conversation")
        if conversation is None:  # one quiet pass for the peak memory
            conversation = bench_conversation(argparse.Namespace(**dict(vars(args), repeats=1)), device, amp, True)
        results["memory"] = bench_memory(args, device, amp, conversation)
    if "smat" in args.sections:
        results["smat"] = bench_smat(args, device, amp)

    summary = []
    if "conversation" in results:
        c = results["conversation"]
        summary.append(f"turn-{args.turns}/turn-1 RxT {c['rxt']['turn_n_over_turn_1']:.2f}x vs baseline "
                       f"{c['baseline']['turn_n_over_turn_1']:.2f}x (total conversation time baseline/RxT "
                       f"{c['total_user_baseline_over_rxt']:.2f}x)")
    if "attention" in results:
        a, T = results["attention"], args.seq_lens[-1]
        summary.append(f"at {T} tokens fwd sSQA {a['variants']['sSQA']['by_len'][T]['forward_speedup']:.2f}x, "
                       f"xSQA {a['variants']['xSQA']['by_len'][T]['forward_speedup']:.2f}x over MHA")
    if "training" in results:
        summary.append(", ".join(f"{p} {r['tokens_per_s']:.0f} train tokens/s"
                                 for p, r in results["training"]["presets"].items()))
    if "smat" in results:
        summary.append(f"SMAT {results['smat']['chunks_episodes_per_s']:.1f} episodes/s in chunks, "
                       f"{results['smat']['speedup']:.2f}x padded")
    results["summary"] = "; ".join(summary)
    results["elapsed_s"] = time.perf_counter() - t_start

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    png = plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out}" + (f" and {png}" if png else "") + f" in {results['elapsed_s']:.0f} s")
    print("summary: " + results["summary"])
    return results


if __name__ == "__main__":
    cli.run(main)
