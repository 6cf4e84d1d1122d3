"""Stages 3-5 (train_mrl.py) and the memory evaluation: BLEU, memory pre-training, SMAT recall, IMPO, freezing."""

import math
import os
import random
import runpy
from collections import Counter

import pytest
import torch

import evaluate
import scores
import rl
import train_mrl
import training
from conftest import TINY
from data.loaders import episode_tensors
from data.memory_world import read_jsonl
from data.tokenizer import Tokenizer
from model import ReactiveTransformer, get_config


def reference_bleu(cand, ref, max_n=4):
    """Plain-Python per-sentence BLEU with the same smoothing as scores.bleu (add-one for n > 1)."""
    if not cand:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        c = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
        r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches, total = sum(min(k, r[g]) for g, k in c.items()), max(0, len(cand) - n + 1)
        if n == 1:
            if matches == 0:
                return 0.0
            logs.append(math.log(matches / total))
        else:
            logs.append(math.log((matches + 1) / (total + 1)))
    bp = 1.0 if len(cand) > len(ref) else math.exp(1 - len(ref) / len(cand))
    return bp * math.exp(sum(logs) / max_n)


def pad(seqs, value):
    L = max(1, max(map(len, seqs)))
    return torch.tensor([s + [value] * (L - len(s)) for s in seqs]), torch.tensor([len(s) for s in seqs])


def test_bleu_matches_a_plain_python_reference_on_random_sequences():
    rng = random.Random(0)
    cands = [[rng.randrange(6) for _ in range(rng.randrange(0, 15))] for _ in range(300)]
    refs = [[rng.randrange(6) for _ in range(rng.randrange(1, 15))] for _ in range(300)]
    c, c_len = pad(cands, 0)
    r, r_len = pad(refs, -1)
    got = scores.bleu(c, c_len, r, r_len)
    want = torch.tensor([reference_bleu(a, b) for a, b in zip(cands, refs)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want > 0).sum() > 100  # the comparison is not all zeros


def test_bleu_is_one_for_identical_and_zero_for_disjoint_answers():
    c, c_len = pad([[1, 2, 3, 4, 5], [1, 2, 3]], 0)
    r, r_len = pad([[1, 2, 3, 4, 5], [7, 8, 9]], -1)
    torch.testing.assert_close(scores.bleu(c, c_len, r, r_len), torch.tensor([1.0, 0.0]))


def tiny_model(tok, **overrides):
    torch.manual_seed(0)
    return ReactiveTransformer(get_config("nano", vocab_size=tok.vocab_size, **dict(TINY, **overrides)))


def cfg_for(**overrides):
    return dict(train_mrl.DEFAULTS, seq_len=64, **overrides)


def test_memory_attention_pretraining_loss_falls(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = tiny_model(tok)
    episodes = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 2][:64]
    turns = episode_tensors(tok, episodes, 64, "cpu", pad_to=model.cfg.stm_size)
    opt = torch.optim.AdamW(model.memory_attention.parameters(), lr=3e-3)
    cfg, g = cfg_for(), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss, _ = train_mrl.memory_pretrain_loss(model, turns, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses[::8]


# A tiny memory world of its own: turn 1 says which colour a name likes, the probe asks for it (distance 1).
COLOURS = ["red", "blue", "green", "pink", "brown", "black", "white", "gold"]
NAMES = ["Mia", "Tom", "Ben", "Lily", "Sam", "Anna"]


def colour_episodes(n, seed):
    rng = random.Random(seed)
    eps = []
    for _ in range(n):
        name, colour = rng.choice(NAMES), rng.choice(COLOURS)
        eps.append({"query": f"{name} likes {colour}.", "answer": "I see.", "distance": 1, "gold": colour,
                    "interactions": [{"query": f"What does {name} like?", "answer": colour}]})
    return eps


def binding_episodes(n, seed):
    """Turn 1 gives the same slot to two people ("Mia likes red. Tom likes blue."), the probe asks for one of them."""
    rng, eps = random.Random(seed), []
    for _ in range(n):
        (a, b), (ca, cb) = rng.sample(NAMES, 2), rng.sample(COLOURS, 2)
        told = [f"{a} likes {ca}.", f"{b} likes {cb}."]
        rng.shuffle(told)
        eps.append({"query": " ".join(told), "answer": "I see.", "distance": 1, "gold": ca,
                    "interactions": [{"query": f"What does {a} like?", "answer": ca}]})
    return eps


def smat_recall_and_control(tok, train, test, steps=250, **model_options):
    """Train a tiny model with SMAT on train episodes; recall on test, and with the memory reset before the probe."""
    model = tiny_model(tok, **model_options)
    cfg, g = cfg_for(), torch.Generator().manual_seed(0)
    params = [p for n, p in model.named_parameters() if not n.startswith("mlm_head.")]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for step in range(steps):
        batch = [train[i] for i in torch.randint(len(train), (32,), generator=g).tolist()]
        loss, _ = train_mrl.smat_loss(model, episode_tensors(tok, batch, 64, "cpu"), cfg, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    ecfg = dict(evaluate.DEFAULTS, max_answer=4)
    recall = sum(evaluate.play(model, tok, test, ecfg)) / len(test)
    control = sum(evaluate.play(model, tok, test, ecfg, reset_before_probe=True)) / len(test)
    return recall, control


def test_smat_makes_recall_beat_the_reset_memory_control(world):
    """The end-to-end memory test: after SMAT, the answer told one turn earlier is recalled far above chance,
    and the same model with its memory reset before the probe is not."""
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    recall, control = smat_recall_and_control(tok, colour_episodes(2000, seed=1), colour_episodes(200, seed=2))
    assert recall > 0.6 and control < 0.3, (recall, control)  # chance is 1/8


def test_binding_recall_beats_the_reset_memory_control(world):
    """Two people, one slot, one turn earlier: with nano's memory options the answer comes from memory, far above
    the reset control. Measured: recall 0.53, control 0.0 (reference options, 250-800 steps: 0.26-0.28 vs 0.12-0.14).
    At this size the model remembers the two colours told but not reliably whose each was, so the bar is the control,
    not 0.5."""
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    options = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "config", "nano_mlm.py"))["model_args"]
    recall, control = smat_recall_and_control(tok, binding_episodes(2000, seed=1), binding_episodes(200, seed=2),
                                              steps=400, **options)
    assert recall > control + 0.3, (recall, control)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_impo_step_moves_the_policy_towards_rewarded_answers(world, seed):
    """Toy reward: 1 if the sampled answer contains token X. A few IMPO steps raise X's probability, whatever the
    rollouts (measured over 8 seeds: +0.10 to +0.12, asserted +0.05)."""
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = tiny_model(tok)
    X = tok.encode(" red")[0]
    with torch.no_grad():  # make X a plausible sample at first, so that some rollouts are rewarded
        model.decoder.lm_head.bias[X] += 4.0
    critic = train_mrl.Critic(model)
    cfg = cfg_for(mrl_max_answer=6, mrl_ppo_epochs=1, mrl_reset_prob=0.0)
    episodes = colour_episodes(16, seed=3)

    def contains_x(model, ans, ans_len, ref_ids, ref_mask, is_probe, cfg, tok):
        valid = torch.arange(ans.size(1))[None] < ans_len[:, None]
        return ((ans == X) & valid).any(dim=1).float()

    def p_x():
        q = torch.tensor([[tok.bos_id, tok.q_id] + tok.encode("What does Mia like?") + [tok.a_id]])
        with torch.no_grad():
            logits, _, _ = model.decode(q, model.new_memory(1, generator=torch.Generator().manual_seed(0)))
        return logits[0, -1].softmax(-1)[X].item()

    before = p_x()
    opt = torch.optim.AdamW(list(model.parameters()) + list(critic.parameters()), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    rewarded = 0.0
    for _ in range(8):
        play = rl.rollout(model, episodes, tok, cfg, g, reward_fn=contains_x)
        rewarded += play["steps"][-1]["reward"].mean().item() / 8
        loss, metrics = rl.impo_loss(model, critic, play, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 0.05 < rewarded < 0.95  # there was something to learn from
    assert p_x() > before + 0.05, (before, p_x())


def test_clipping_stops_the_gain_from_moving_the_policy_further_than_eps():
    logp = torch.log(torch.tensor([2.0, 1.1, 0.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    surrogate, ratio = rl.clipped_surrogate(logp, torch.zeros(4), adv, eps=0.2)
    torch.testing.assert_close(surrogate, torch.tensor([1.2, 1.1, -0.8, 0.5]))  # r=2 clipped, r=0.5 with A<0 clipped
    surrogate.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[2] == 0 and logp.grad[1] > 0 and logp.grad[3] > 0


def impo_setup(world, **overrides):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = tiny_model(tok)
    cfg = cfg_for(mrl_max_answer=4, mrl_reset_prob=0.0, **overrides)
    play = rl.rollout(model, colour_episodes(8, seed=0), tok, cfg, torch.Generator().manual_seed(0))
    return model, train_mrl.Critic(model), play, cfg


def grad_norm(module):
    return sum(p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None) ** 0.5


def test_the_advantage_is_the_reward_minus_the_critics_value(world):
    """A critic that predicts every reward exactly leaves no advantage: the policy gets no gradient. (Without the
    baseline it would get the normalised reward itself.)"""
    model, critic, play, cfg = impo_setup(world, mrl_entropy_coef=0.0, mrl_kl_coef=0.0, mrl_memory_reg=0.0,
                                          mrl_value_coef=0.0)
    for s in play["steps"]:
        s["reward"] = torch.rand(s["reward"].shape)  # rewards that vary, so that there is something to normalise
    values = iter([s["reward"] for s in play["steps"]])
    loss, _ = rl.impo_loss(model, lambda *_: next(values), play, cfg)
    loss.backward()
    assert grad_norm(model.decoder) < 1e-6
    model.zero_grad()
    loss, _ = rl.impo_loss(model, lambda q, m, stm: torch.zeros(q.size(0)), play, cfg)
    loss.backward()
    assert grad_norm(model.decoder) > 1e-3


def test_the_memory_regulariser_alone_trains_the_write_to_change_less(world):
    model, _, play, cfg = impo_setup(world, mrl_entropy_coef=0.0, mrl_kl_coef=0.0, mrl_value_coef=0.0)
    for s in play["steps"]:
        s["reward"] = torch.zeros_like(s["reward"])
    critic = lambda q, m, stm: torch.zeros(q.size(0))  # predicts every reward: no advantage, no policy gradient
    loss, _ = rl.impo_loss(model, critic, play, cfg)
    loss.backward()
    assert grad_norm(model.memory_attention) > 0
    model.zero_grad()
    loss, _ = rl.impo_loss(model, critic, play, dict(cfg, mrl_memory_reg=0.0))
    loss.backward()
    assert grad_norm(model.memory_attention) == 0


def test_unfreeze_schedule_controls_where_decoder_gradients_flow(world):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    model = tiny_model(tok, stm_init="learned")  # every kind of parameter, the learned initial slots too
    cfg = cfg_for(max_iters=100, smat_unfreeze_memory_at=0.2, smat_unfreeze_encoder_at=0.5)
    episodes = [ep for ep in read_jsonl(os.path.join(world, "episodes_train.jsonl")) if ep["distance"] == 1][:8]
    turns = episode_tensors(tok, episodes, 64, "cpu")

    def grads_at(step):
        train_mrl.set_trainable(model, step, cfg)
        model.zero_grad(set_to_none=True)
        loss, _ = train_mrl.smat_loss(model, turns, cfg, torch.Generator().manual_seed(0))
        loss.backward()
        parts = {"decoder": model.decoder.parameters(), "memory_attention": model.memory_attention.parameters(),
                 "encoder": model.encoder.parameters(), "embed": model.embed.parameters(), "stm_init": [model.stm_init]}
        return {part: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps) for part, ps in parts.items()}

    assert grads_at(0) == {"decoder": True, "memory_attention": False, "encoder": False, "embed": False,
                           "stm_init": False}
    assert grads_at(20) == {"decoder": True, "memory_attention": True, "encoder": False, "embed": False,
                            "stm_init": True}
    assert grads_at(50) == {"decoder": True, "memory_attention": True, "encoder": True, "embed": True, "stm_init": True}


def test_train_mrl_runs_every_phase_and_chains_checkpoints(world, tmp_path):
    from conftest import tiny_flags
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    start = tmp_path / "start.pt"
    training.save_checkpoint(str(start), tiny_model(tok), stage="sft", step=0, cfg={}, tokenizer=tok)
    results = train_mrl.main(tiny_flags(data_dir=world, out_dir=str(tmp_path), init_from=str(start), batch_size=4,
                                        mem_iters=3, smat_iters=3, mrl_iters=2, eval_interval=100,
                                        mrl_curriculum=[[2]], mrl_max_answer=4))
    assert set(results) == {"mem", "smat", "mrl"}
    previous = str(start)
    for phase in results:  # each phase starts from the one before it
        ckpt = training.load_checkpoint(str(tmp_path / phase / "ckpt.pt"))
        assert ckpt["stage"] == phase and ckpt["step"] == ckpt["config"]["max_iters"]
        assert ckpt["config"]["init_from"] == previous
        previous = str(tmp_path / phase / "ckpt.pt")
    assert "critic" in training.load_checkpoint(str(tmp_path / "mrl/ckpt.pt"))["extra"]
    assert all(math.isfinite(v) for r in results.values() for v in r.values())


def test_memory_eval_reports_recall_and_control_by_distance(world, tmp_path):
    tok = Tokenizer.from_file(os.path.join(world, "tokenizer.tiktoken"))
    ckpt = tmp_path / "m.pt"
    training.save_checkpoint(str(ckpt), tiny_model(tok), stage="smat", step=0, cfg={}, tokenizer=tok)
    results = evaluate.main([f"--ckpt={ckpt}", f"--data_dir={world}", "--n_per_distance=10", "--max_answer=4",
                             "--device=cpu"])
    recall = results["recall"]
    assert sorted(recall) == [1, 2, 4, 8]
    assert all(r["n"] == 10 and 0 <= r["recall"] <= 1 and 0 <= r["reset_control"] <= 1 for r in recall.values())
    assert os.path.isfile(tmp_path / "eval.json")
