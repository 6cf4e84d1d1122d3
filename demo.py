"""
The offline demo in one command: build the memory world and its tokenizer, train the `nano` RxT through every
stage of the curriculum on 2 CPU cores, evaluate its memory, write a report card, then chat with it.

    python demo.py              # ~21 minutes on 2 CPU cores, then chat.py
    python demo.py --no-chat    # for scripts
    python demo.py --baseline   # then also train and evaluate the stateless baseline: the paper's comparison
    python demo.py --dmpo       # the last stage is DMPO (preferences through the memory) instead of MRL
    python demo.py --device=cpu --dtype=float32 --compile=False   # passed to every training stage
Re-running reuses finished stages (each stage resumes from its checkpoint, or sees it is done).
Every stage is the documented command of its script, so the demo is also the recipe.
"""

import json
import os
import subprocess
import sys
import time

import cli
import training
from evaluate import format_table

OUT = "out/nano"
WORLD = "data/cache/world"


PASS_THROUGH = ("--device=", "--dtype=", "--compile=")  # flags every training stage takes


def stages(extra, baseline, final="mrl"):
    py = sys.executable
    rxt = [("world", [py, "-m", "data.memory_world", "--out_dir", WORLD]),
           ("mlm", [py, "train_mlm.py", "config/nano_mlm.py", *extra]),
           ("joint", [py, "train_joint.py", "config/nano_joint.py", *extra]),
           ("sft", [py, "train_joint.py", "config/nano_sft.py", *extra]),
           ("memory stages", [py, "train_mrl.py", "config/nano_mrl.py", f"--phases=smat,{final}", *extra]),
           ("eval", [py, "evaluate.py", f"--ckpt={OUT}/{final}/ckpt.pt", f"--out={OUT}/eval.json"])]
    stateless = [("baseline lm", [py, "train_baseline.py", "config/nano_baseline_lm.py", *extra]),
                 ("baseline", [py, "train_baseline.py", "config/nano_baseline.py", *extra]),
                 ("baseline eval", [py, "evaluate.py", f"--ckpt={OUT}/baseline/ckpt.pt",
                                    f"--out={OUT}/baseline/eval.json"])]
    return rxt + (stateless if baseline else [])


def stage_metrics(path):
    if not os.path.isfile(path):
        return None
    ckpt = training.load_checkpoint(path)
    return ckpt["step"], ckpt["metrics"]


def report(wall, final="mrl"):
    """The run's report card: each stage's time and final metrics, and the recall-by-distance table."""
    lines = ["# nanoRxT nano demo - report card", "", f"The model evaluated is the last stage's: {final} "
             f"({OUT}/{final}/ckpt.pt).", "", "| stage | steps | time (s) | final metrics |", "|---|---|---|---|"]
    for stage in ["mlm", "joint", "sft", "mem", "smat", final]:
        got = stage_metrics(f"{OUT}/{stage}/ckpt.pt")
        if got:
            step, m = got
            shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k not in ("tokens", "seconds"))
            lines.append(f"| {stage} | {step} | {m.get('seconds', 0):.0f} | {shown} |")
    lines += ["", "Wall time per demo step (this run, s): " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()), ""]
    eval_path = f"{OUT}/eval.json"
    if os.path.isfile(eval_path):
        results = json.load(open(eval_path))["results"]
        lines += ["## Memory on held-out episodes (greedy, exact match): recall by turns between fact and question",
                  "", "```", format_table(results), "```"]
        plot(results["recall"])
        if os.path.isfile(f"{OUT}/baseline/eval.json"):
            lines += ["", comparison(results, json.load(open(f"{OUT}/baseline/eval.json"))["results"], final)]
    text = "\n".join(lines) + "\n"
    with open(f"{OUT}/report.md.tmp", "w") as f:
        f.write(text)
    os.replace(f"{OUT}/report.md.tmp", f"{OUT}/report.md")
    return text


def comparison(rxt, base, final="mrl"):
    """RxT next to the stateless baseline on the same held-out episodes (the baseline re-reads the history)."""
    def seconds(stages):
        return sum((stage_metrics(f"{OUT}/{s}/ckpt.pt") or (0, {}))[1].get("seconds", 0) for s in stages)

    def size(path):
        return sum(v.numel() for v in training.load_checkpoint(path)["model"].values()) if os.path.isfile(path) else 0

    rows = [("recall, d=" + d, f"{rxt['recall'][d]['recall']:.1%}", f"{base['recall'][d]['recall']:.1%}")
            for d in rxt["recall"] if rxt["recall"][d] and base["recall"].get(d)]
    rows += [("binding, d=" + d, f"{rxt['binding'][d]['recall']:.1%}", f"{base['binding'][d]['recall']:.1%}")
             for d in rxt["binding"] if rxt["binding"][d] and base["binding"].get(d)]
    rows += [(f"span ({layout}): facts kept at 90%", str(n), str(base["span_kept"][layout]))
             for layout, n in rxt.get("span_kept", {}).items() if layout in base.get("span_kept", {})]
    rows += [("in-context", f"{rxt['in_context']['recall']:.1%}", f"{base['in_context']['recall']:.1%}"),
             ("answer perplexity", f"{rxt['answer_tokens']['ppl']:.3f}", f"{base['answer_tokens']['ppl']:.3f}"),
             ("answer accuracy", f"{rxt['answer_tokens']['acc']:.1%}", f"{base['answer_tokens']['acc']:.1%}"),
             ("parameters", f"{size(f'{OUT}/{final}/ckpt.pt'):,}", f"{size(f'{OUT}/baseline/ckpt.pt'):,}"),
             ("training time (s)", f"{seconds(['mlm', 'joint', 'sft', 'mem', 'smat', final]):.0f}",
              f"{seconds(['baseline_lm', 'baseline']):.0f}")]
    return "\n".join(["## RxT vs a stateless LLM on the same conversations", "", "| | RxT | stateless |",
                      "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def plot(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no recall plot, the table is in the report)")
        return
    d = [int(k) for k in results]
    plt.figure(figsize=(5, 3.5))
    plt.plot(d, [r["recall"] for r in results.values()], "o-", label="RxT memory")
    plt.plot(d, [r["reset_control"] for r in results.values()], "s--", label="STM reset (control)")
    plt.xscale("log", base=2)
    plt.xlabel("turns between fact and probe")
    plt.ylabel("recall")
    plt.ylim(0, 1)
    plt.legend()
    plt.tight_layout()
    plt.savefig(f"{OUT}/recall.png", dpi=120)


def main(argv):
    unknown = [a for a in argv if a not in ("--no-chat", "--baseline", "--dmpo") and not a.startswith(PASS_THROUGH)]
    if unknown:
        raise cli.ConfigError(f"unknown option(s) {' '.join(unknown)}: demo.py takes --no-chat, --baseline, --dmpo and "
                              f"{', '.join(f + '...' for f in PASS_THROUGH)} (passed to every training stage)")
    extra = [a for a in argv if a.startswith(PASS_THROUGH)]
    for flag in extra:  # checked here, before the first stage, with the rules the stages use
        key, _, value = flag[2:].partition("=")
        if key == "device":
            cli.check_device(value)
        else:
            cli.configure(training.TRAIN_DEFAULTS, [flag])
            cli.check({key: value}, **{key: training.TRAIN_RULES.get(key, (lambda v: True, ""))})
    os.makedirs(OUT, exist_ok=True)
    wall, t_start, final = {}, time.time(), "dmpo" if "--dmpo" in argv else "mrl"
    for name, cmd in stages(extra, "--baseline" in argv, final):
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        if subprocess.run(cmd).returncode != 0:
            print(f"demo: stage {name!r} failed; fix it and re-run: finished stages are kept", file=sys.stderr)
            return 1
        wall[name] = time.time() - t0
    total = time.time() - t_start
    print("\n" + report(wall, final))
    print(f"demo finished in {total / 60:.1f} min; report card: {OUT}/report.md")
    if "--no-chat" not in argv:
        print("\nNow chat with it (try: 'Mia has a red ball.' then a few other turns, then 'What colour is Mia's ball?')")
        return subprocess.run([sys.executable, "chat.py", f"--ckpt={OUT}/{final}/ckpt.pt"]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
