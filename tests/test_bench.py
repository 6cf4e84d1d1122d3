"""bench.py runs end to end: `python bench.py --quick` writes every section with positive numbers (no timing checks)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary:" in proc.stdout
    r = json.loads(out.read_text())
    assert {"conversation", "attention", "training", "memory", "summary"} <= set(r)

    conv = r["conversation"]
    for name in ("rxt", "baseline"):
        turns = conv[name]["per_turn"]
        assert len(turns) == conv["turns"] >= 2
        assert all(t["prefill"] > 0 and t["generation"] > 0 and t["tokens"] > 0 for t in turns)
        assert conv[name]["turn_n_over_turn_1"] > 0 and conv[name]["peak_memory_bytes"] > 0
        assert conv[name]["decode_token_s"] > 0 and conv[name]["aten_ops_per_token"] > 10
    assert all(t["update"] > 0 for t in conv["rxt"]["per_turn"])
    # what the user waits for is the answer; RxT's memory update runs after it, in the background
    for name in ("rxt", "baseline"):
        assert all(t["user"] == pytest.approx(t["prefill"] + t["generation"]) for t in conv[name]["per_turn"])
        assert conv[name]["total_user_s"] == pytest.approx(sum(t["user"] for t in conv[name]["per_turn"]))
    assert conv["total_user_baseline_over_rxt"] == pytest.approx(conv["baseline"]["total_user_s"] /
                                                                 conv["rxt"]["total_user_s"])
    # the baseline re-reads the history: its prompt grows by one interaction per turn, RxT's work per turn does not
    base_tokens = [t["tokens"] for t in conv["baseline"]["per_turn"]]
    assert base_tokens == sorted(base_tokens) and base_tokens[-1] > base_tokens[0]
    assert len({t["tokens"] for t in conv["rxt"]["per_turn"]}) == 1

    attn = r["attention"]
    assert set(attn["variants"]) == {"MHA", "GQA", "MQA", "SQA", "sSQA", "xSQA"}
    for v in attn["variants"].values():
        # attention scores cost ~ query heads: SQA's theoretical speed-up is H / Hq, whatever its key/value heads
        assert v["theory_score_speedup"] == attn["n_heads"] / v["n_q_heads"]
        for T, m in v["by_len"].items():
            assert m["forward_s"] > 0 and m["forward_backward_s"] > 0 and m["forward_speedup"] > 0
            mha = attn["variants"]["MHA"]["by_len"][T]  # a speed-up over MHA: MHA's time over this variant's
            assert m["forward_speedup"] == pytest.approx(mha["forward_s"] / m["forward_s"])

    train = r["training"]
    assert train["matmul_fp32_flops_per_s"] > 0 and train["presets"]
    assert all(p["tokens_per_s"] > 0 and p["flops_per_s"] > 0 for p in train["presets"].values())
    for p in train["presets"].values():  # forward and backward: 6 FLOPs per active matmul parameter per token
        assert p["flops_per_s"] == pytest.approx(6 * p["active_matmul_params"] * p["tokens_per_s"])

    mem = r["memory"]
    assert mem["stm_bytes"] > 0 and all(v > 0 for v in mem["peak_memory_bytes"].values())
    kv = [t["baseline_kv_bytes"] for t in mem["by_turn"].values()]
    assert kv == sorted(kv) and kv[-1] > 0


def test_bench_smat_compares_padded_and_chunked_steps_on_the_world(tmp_path, world):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--sections=smat", f"--data_dir={world}",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    smat = json.loads(out.read_text())["smat"]
    assert smat["padded_episodes_per_s"] > 0 and smat["chunks_episodes_per_s"] > 0
    for phase in smat["real_share"].values():  # chunks compute less padding, never more
        assert 0 < phase["padded"] <= phase["chunks"] <= 1


def test_attention_score_flops_count_the_causal_half_of_two_matmuls():
    sys.path.insert(0, ROOT)
    import bench
    # QK^T and AV for B=1, one head, T=4, hd=2: 2 matmuls x 2 FLOPs per multiply-add x 4 x 4 x 2, half of it causal
    assert bench.score_flops(1, 1, 4, 2) == 2 * 2 * 4 * 4 * 2 // 2 == 64
    assert bench.score_flops(2, 3, 8, 16) == 3 * 2 * bench.score_flops(1, 1, 8, 16)


def test_bench_counts_each_turns_tokens_and_the_baselines_kv_cache_exactly(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--sections=conversation,memory", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    conv, mem = r["conversation"], r["memory"]
    turn = conv["query_len"] + conv["answer_len"]  # the tokens of one interaction
    # RxT: the query and the answer, then the encoder reads the whole interaction; the baseline re-reads everything
    assert [t["tokens"] for t in conv["rxt"]["per_turn"]] == [2 * turn] * conv["turns"]
    assert [t["tokens"] for t in conv["baseline"]["per_turn"]] == [turn * n for n in range(1, conv["turns"] + 1)]
    sys.path.insert(0, ROOT)
    from model import PRESETS
    c = PRESETS["nano"]
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * mem["kv_bytes_per_element"]  # keys and values
    for n, t in mem["by_turn"].items():
        assert t["baseline_kv_bytes"] == per_token * (int(n) - 1) * turn  # the history before turn n
