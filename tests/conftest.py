"""Shared fixtures: a small memory world (built once per test session) and tiny model sizes for fast CPU tests."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a model small enough that a few hundred CPU steps take seconds (nano's layout, scaled down)
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_q_heads=2, n_kv_heads=2, enc_ff_dim=64, n_experts=4, top_k=2,
            expert_dim=64, seq_len=64, stm_size=16)


def tiny_flags(**extra):
    """--key=value flags for a training script: nano preset shrunk to TINY, CPU, quiet logs."""
    flags = dict(preset="nano", model_args=TINY, device="cpu", batch_size=16, seq_len=64, eval_iters=2,
                 log_interval=1000, warmup_iters=10)
    flags.update(extra)
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small offline memory world: stories (.bin), interactions, episodes and a 512-token BPE."""
    from data.memory_world import build_world
    out = tmp_path_factory.mktemp("world")
    build_world(str(out), seed=7, n_stories=3000, n_interactions=2000, n_episodes=3000, n_test_episodes=300,
                vocab_size=512)
    return str(out)
