"""
Mutation testing: does the suite notice a realistic bug? Each mutation below breaks one line of the project the way a
person might (a flipped sign, an off-by-one, a dropped mask, a wrong normaliser, an inverted condition, ...); the
script applies it to a temporary copy of the repository, runs the tests that should notice it, and reports whether
they went red. A missed mutation is a test to write (or a line nothing depends on). README's Tests section documents it.

    python tests/mutate.py                  # every mutation, one at a time (long: each runs its tests on CPU)
    python tests/mutate.py --only engine    # the mutations whose file or description contains "engine"
    python tests/mutate.py --list           # what would run, and with which tests
    python tests/mutate.py --check          # every `old` occurs exactly once (seconds, no tests run; exit 1 if not)
    python tests/mutate.py --jobs 2         # two mutations at a time

Not a test itself (pytest collects test_*.py only), and always exits 0 after a run: it is a report.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The natural tests of each part: as narrow as still meaningful, so that a mutation takes seconds to a minute
MODEL = ["tests/test_model.py", "tests/test_formulas_and_options.py"]
CHUNKS, LOADERS = ["tests/test_chunks.py"], ["tests/test_data_loaders.py"]
GENERATION = MODEL + ["tests/test_precision.py::"
                      "test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype"]
PLUMBING = ["tests/test_training_plumbing.py"]
STAGES = "tests/test_train_stages.py::"
RESUME = [STAGES + "test_interrupted_run_resumes_to_the_same_weights"]
JOINT_RUN = [STAGES + "test_mlm_and_joint_losses_fall_far_below_chance_and_accuracy_beats_most_frequent_token",
             STAGES + "test_joint_decoder_reads_the_encoded_memory"]
BAD_SETTINGS = ["tests/test_bad_input.py::test_training_scripts_refuse_bad_settings_before_any_work"]
MRL = "tests/test_mrl.py::"
FORMULAS = "tests/test_formulas_and_options.py"
BLEU = [MRL + "test_bleu_matches_a_plain_python_reference_on_random_sequences",
        MRL + "test_bleu_is_one_for_identical_and_zero_for_disjoint_answers"]
IMPO = ["tests/test_rl_mechanics.py", "tests/test_mrl_fixes.py",
        MRL + "test_clipping_stops_the_gain_from_moving_the_policy_further_than_eps",
        MRL + "test_the_advantage_is_the_reward_minus_the_critics_value",
        MRL + "test_the_memory_regulariser_alone_trains_the_write_to_change_less"]
SMAT = ["tests/test_chunks.py::test_smat_episode_in_chunks_gives_the_padded_loss_and_gradients",
        MRL + "test_unfreeze_schedule_controls_where_decoder_gradients_flow",
        "tests/test_mrl_fixes.py::test_smat_loss_decodes_the_first_turn_from_a_fresh_memory"]
DMPO = ["tests/test_dmpo.py"]
CONVERT = ["tests/test_convert_rxnn.py"]
RECALL = [MRL + "test_smat_makes_recall_beat_the_reset_memory_control"]
EVAL = ["tests/test_evaluation_rows.py", MRL + "test_memory_eval_reports_recall_and_control_by_distance",
        "tests/test_baseline.py::test_the_baseline_trains_and_is_evaluated_on_the_same_episodes"]

# (file, old: verbatim and exactly once in the file, new, tests, description)
MUTATIONS = [
    ("model.py", "torch.cat([-angles.sin(), angles.sin()], dim=-1)", "torch.cat([angles.sin(), angles.sin()], dim=-1)",
     MODEL, "rope: sin not sign-folded, no longer a rotation"),
    ("model.py", "k, v = F.linear(context,", "v, k = F.linear(context,", MODEL,
     "attention: cross-attention keys and values swapped"),
    ("model.py", "return F.silu(gate) * up", "return F.silu(up) * gate", MODEL, "glu: silu on the wrong half"),
    ("model.py", "weights = weights / weights.sum(dim=-1, keepdim=True)",
     "weights = weights / weights.sum(dim=0, keepdim=True)", MODEL,
     "moe: top-k weights renormalised over the wrong dim"),
    ("model.py", "real.repeat_interleave(self.top_k)", "real.repeat(self.top_k)", MODEL + CHUNKS,
     "moe: token mask repeated instead of interleaved over routing slots"),
    ("model.py", "return slots.size(-1) * (f * p).sum(dim=-1).mean()", "return (f * p).sum(dim=-1).mean()",
     MODEL + CHUNKS, "balancing_loss: factor E dropped"),
    ("model.py", "p = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-9)",
     "p = mass / slots.sum(dim=-1, keepdim=True).clamp(min=1)", MODEL + CHUNKS,
     "balancing_loss: P_e divided by routing slots (k per token), not tokens"),
    ("model.py", "return (1 - g) * stm + g * update", "return g * stm + (1 - g) * update", MODEL, "gate: mix swapped"),
    ("model.py", "memory_mask, self_mask, is_causal,", "memory_mask, self_mask, False,", MODEL,
     "decoder: is_causal not passed to the layers"),
    ("model.py", "memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]", "memory_mask = None",
     MODEL, "decoder: memory padding mask dropped"),
    ("model.py", "q_rope=rope_cs if self.memory_rope else None", "q_rope=None", MODEL,
     "memory read: queries not rotated"),
    ("model.py", "key_mask = None if ed_mask is None else ed_mask[:, None, None, :]", "key_mask = None", MODEL + CHUNKS,
     "memory write: ED padding mask dropped"),
    ("model.py", "k_rope=ed_rope, attn_mask=ed_mask)", "k_rope=None, attn_mask=ed_mask)", MODEL,
     "memory write: token keys not rotated"),
    ("model.py", "context = self.pre_norm_kv(stm_mean)", "context = self.pre_norm_kv(stm_l)", MODEL,
     "interlayer memory attention reads its own layer"),
    ("model.py", "n_masked = (targets != -100).sum().clamp(min=1)", "n_masked = targets.numel()", MODEL + CHUNKS,
     "mlm: loss divided by every position, not the masked ones"),
    ("model.py", "ce / (targets != -100).sum().clamp(min=1)", "ce / targets.numel()", MODEL + CHUNKS,
     "decode: loss divided by every position, not the counted ones"),
    ("model.py", "order = torch.cat([rows for rows, _ in chunks]).argsort()",
     "order = torch.cat([rows for rows, _ in chunks])", CHUNKS + MODEL,
     "unchunk: permutation used instead of its inverse"),
    ("model.py", "(0, length - p.size(dim + 1))", "(length - p.size(dim + 1), 0)", CHUNKS + MODEL,
     "unchunk: parts padded on the left"),
    ("model.py", "m = int(mem_mask.sum(dim=1).max())", "m = int(mem_mask.sum(dim=1).min())", CHUNKS + MODEL,
     "decode in chunks: ED cut to its shortest row"),
    ("model.py", "return (logits.argmax(dim=-1) == targets)[counted].float().mean()",
     "return (logits.argmax(dim=-1) == targets).float().mean()", MODEL, "token_accuracy counts ignored positions"),
    ("model.py", "logp_all.gather(-1, ids[:, 1:, None])", "logp_all.gather(-1, ids[:, :-1, None])",
     MODEL + ["tests/test_mrl_fixes.py", MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "token_logprobs: off by one"),
    ("model.py", '(self.gate_type in GATES, f"gate_type', '(True, f"gate_type', MODEL,
     "config: gate_type check removed"),

    ("engine.py", "self.len += T", "self.len = T", GENERATION, "kv cache: length reset instead of advanced"),
    ("engine.py", 'logits.masked_fill(logits < kth, float("-inf"))', 'logits.masked_fill(logits <= kth, float("-inf"))',
     GENERATION, "top_k keeps k-1 tokens"),
    ("engine.py", "drop = p.cumsum(dim=-1) - p > top_p", "drop = p.cumsum(dim=-1) > top_p", GENERATION,
     "top_p drops the token that reaches the mass"),
    ("engine.py", "logits = logits.float() / temperature", "logits = logits.float() * temperature", GENERATION,
     "temperature multiplies the logits"),
    ("engine.py", "key_valid[:, :T] = attn_mask", "key_valid[:, :T] = True", GENERATION,
     "padded generation attends to the prompt's pads"),
    ("engine.py", "pos = lengths + step", "pos = lengths + step + 1", GENERATION,
     "padded generation: positions off by one"),
    ("engine.py", "torch.full((sa.n_q * hd,), hd ** -0.5)", "torch.full((sa.n_q * hd,), hd ** 0.5)", GENERATION,
     "FastStep: attention scale inverted"),
    ("engine.py", "alpha=w_e / sum(w)", "alpha=w_e", GENERATION, "FastStep: expert weights not renormalised"),
    ("engine.py", "is_eos.float().argmax(dim=1) + 1", "is_eos.float().argmax(dim=1)",
     MODEL + ["tests/test_mrl_fixes.py"], "generate: lengths exclude [EOS]"),

    ("training.py", 'return cfg["lr"] * (step + 1) / cfg["warmup_iters"]',
     'return cfg["lr"] * step / cfg["warmup_iters"]', PLUMBING, "warmup starts at lr 0 and ends short of lr"),
    ("training.py", "0.5 * (1 + math.cos(math.pi * progress))", "0.5 * (1 - math.cos(math.pi * progress))", PLUMBING,
     "cosine decay runs backwards"),
    ("training.py", 'tmp = path + ".tmp"', "tmp = path", PLUMBING, "checkpoint written in place, not atomically"),
    ("training.py", 'optimizer.load_state_dict(ckpt["optimizer"])', "optimizer = make_optimizer(params, cfg, device)",
     RESUME, "resume: optimizer state not restored"),
    ("training.py", "+ step * 131 + rank", "+ step * 131", [STAGES + "test_each_rank_trains_on_its_own_batches"],
     "every rank draws the same batches"),
    ("training.py", "flat /= world", "flat /= 1", PLUMBING,
     "ddp: gradients summed, not averaged"),
    ("training.py", "no_decay = [p for p in params if p.dim() < 2]", "no_decay = [p for p in params if p.dim() < 1]",
     PLUMBING + ["tests/test_precision.py"], "optimizer: norms, biases and gates left out"),
    ("training.py", 'if (step + 1) % cfg["eval_interval"] == 0', 'if step % cfg["eval_interval"] == 0', RESUME,
     "eval and checkpoint one step early"),
    ("training.py", "if batch is None or step % batch_reuse == 0:", "if batch is None:", RESUME,
     "the first batch is reused for the whole run"),

    ("cli.py", "if not sep:", "if sep:", PLUMBING, "configure: --key=value rejected, --key accepted"),
    ("cli.py", "not isinstance(v, bool) and v >= n)", "not isinstance(v, bool) and v > n)", BAD_SETTINGS + PLUMBING,
     "at_least: bound made exclusive"),
    ("cli.py", "not isinstance(v, bool) and lo <= v <= hi)", "not isinstance(v, bool) and lo < v <= hi)",
     BAD_SETTINGS + PLUMBING, "between: lower bound made exclusive"),
    ("cli.py", "sys.exit(2 if isinstance(e, ConfigError) else 1)", "sys.exit(1 if isinstance(e, ConfigError) else 2)",
     PLUMBING, "exit codes of settings and files swapped"),
    ("cli.py", "if not self.disable and self.total and", "if self.disable and self.total and", ["tests/test_house.py"],
     "progress: log lines only when disabled"),

    ("scores.py", ".all(dim=1) & (ans_len == ref_mask.sum(dim=1))", ".all(dim=1)", ["tests/test_mrl_fixes.py"],
     "exact_match: a cut answer matches"),
    ("scores.py", "[None] + n <= length[:, None]", "[None] + n < length[:, None]", BLEU,
     "bleu: last n-gram of each sentence dropped"),
    ("scores.py", "else (matches + 1) / (total + 1)", "else matches / total.clamp(min=1)", BLEU,
     "bleu: no add-one smoothing"),
    ("scores.py", "torch.exp(1 - r / c.clamp(min=1))", "torch.exp(1 - c / r.clamp(min=1))", BLEU,
     "bleu: brevity penalty inverted"),
    ("scores.py", "torch.minimum(c_counts, r_counts).sum(dim=1)", "c_counts.sum(dim=1)", BLEU,
     "bleu: counts not clipped by the reference"),
    ("scores.py", "text.lower()).strip()", "text).strip()", EVAL, "normalize: case kept, so capitals are dropped"),

    ("data/loaders.py", "masked_fill(~counts[:, 1:], IGNORE)", "masked_fill(~counts[:, :-1], IGNORE)", LOADERS,
     "next_token_targets: mask off by one"),
    ("data/loaders.py", "< prob) & attn_mask", "< prob)", LOADERS, "mlm_inputs masks padding too"),
    ("data/loaders.py", "q[max(0, len(q) + 3 - max_len):]", "q[:max(0, max_len - 3)]",
     LOADERS + ["tests/test_data_tokenizer.py"], "render_query keeps the front of a long query"),
    ("data/loaders.py", "return (prompt + a)[:max_len], len(prompt)", "return (prompt + a)[:max_len], len(prompt) - 1",
     LOADERS, "render_interaction: answer starts one early"),
    ("data/loaders.py", "(j - i) * sorted_len[j - 1] + overhead", "(j - i) * sorted_len[i] + overhead", CHUNKS,
     "length_chunks: a group costed at its shortest row"),
    ("data/loaders.py", "sorted_len[j - 1]) for i, j in reversed(groups)]",
     "sorted_len[i]) for i, j in reversed(groups)]", CHUNKS, "length_chunks: a group cut to its shortest row"),
    ("data/loaders.py", "ans_mask[b, start - 1:end - 1] = True", "ans_mask[b, start:end] = True",
     LOADERS + ["tests/test_mrl_fixes.py"], "join_answers: sampled-token mask off by one"),
    ("data/loaders.py", "seq_len - max_answer - 1", "seq_len - max_answer", LOADERS,
     "collate_queries leaves no room for [EOS]"),
    ("data/loaders.py", "rows = rows[1:]", "rows = rows[:-1]",
     ["tests/test_baseline.py::test_a_conversation_too_long_for_the_context_loses_its_oldest_turns_whole"],
     "render_dialogue drops the newest turn"),
    ("data/loaders.py", 'others = [v for v in values if v != episode["gold"]]', "others = list(values)", DMPO,
     "rejected_answer may reject the gold answer itself"),

    ("data/tokenizer.py", "i += 2", "i += 1", ["tests/test_data_tokenizer.py"], "merge_word: overlapping merges"),
    ("data/tokenizer.py", "n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)", "n_merges = vocab_size - 256",
     ["tests/test_data_tokenizer.py"], "train_bpe: specials not counted in the vocab"),
    ("data/tokenizer.py", "if pair_counts.get(pair, 0) != -neg or neg == 0:",
     "if pair_counts.get(pair, 0) > -neg or neg == 0:", ["tests/test_data_tokenizer.py"],
     "train_bpe: stale heap entries accepted"),
    ("data/tokenizer.py", "len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)",
     "len(ranks) + i + 1 for i, tok in enumerate(SPECIAL_TOKENS)", ["tests/test_data_tokenizer.py"],
     "special ids leave a gap after the ranks"),

    ("data/memory_world.py", "avoid=(vp, p)", "avoid=(p,)", ["tests/test_data_world.py"],
     "binding question: both people may share the value"),
    ("data/memory_world.py", "others = [q for q in NAMES if q != p]", "others = list(NAMES)",
     ["tests/test_data_world.py"], "distractors may mention the probed person"),
    ("data/memory_world.py", "gold = random_value(rng, p, slot, avoid=seen)", "gold = random_value(rng, p, slot)",
     ["tests/test_data_world.py"], "overwrite may repeat an earlier value"),

    ("data/tinystories.py", "if have and response.status != 206:", "if have and response.status != 200:",
     ["tests/test_data_tinystories.py"], "download: a honoured Range request restarts"),
    ("data/tinystories.py", "ids += [tokenizer.bos_id] + story + [tokenizer.eos_id]",
     "ids += story + [tokenizer.eos_id]", ["tests/test_data_tinystories.py"], "tokenize_to_bin: [BOS] missing"),
    ("data/tinystories.py", "buf = buf.strip()", 'buf = ""', ["tests/test_data_tinystories.py"],
     "iter_stories drops the last story"),

    ("train_mrl.py", "prev_ids, prev_mask, _ = turns[t - 1]", "prev_ids, prev_mask, _ = turns[t]", SMAT + RECALL,
     "smat writes the current turn (its answer leaks)"),
    ("train_mrl.py", 'stm.detach() if cfg["smat_detach_stm"] else stm',
     'stm if cfg["smat_detach_stm"] else stm.detach()', SMAT + [FORMULAS], "smat_detach_stm inverted"),
    ("train_mrl.py", '"encoder": step >= cfg["smat_unfreeze_encoder_at"] * n',
     '"encoder": step >= cfg["smat_unfreeze_memory_at"] * n', SMAT, "encoder unfrozen with the memory attention"),
    ("train_mrl.py", 'groups["encoder"], groups["memory_attention"]  # stm_init',
     'groups["memory_attention"], groups["encoder"]  # stm_init', SMAT,
     "embed and stm_init unfreeze schedules swapped"),
    ("train_mrl.py", "label = (1 - w) * stm + w * ed", "label = (1 - w) * new + w * ed",
     [MRL + "test_memory_attention_pretraining_loss_falls", FORMULAS], "mem: the label is built from the model's own write"),
    ("train_mrl.py", 'step * len(curriculum) // max(1, cfg["max_iters"])', 'step // max(1, cfg["max_iters"])',
     [FORMULAS, MRL + "test_train_mrl_runs_every_phase_and_chains_checkpoints"], "curriculum stuck at its first entry"),
    ("train_mrl.py", 'init_from = os.path.join(pcfg["out_dir"], "ckpt.pt")', 'init_from = cfg["init_from"]',
     [MRL + "test_train_mrl_runs_every_phase_and_chains_checkpoints"], "phases do not chain: each starts afresh"),

    ("rl.py", "torch.minimum(ratio * adv,", "torch.maximum(ratio * adv,", IMPO, "PPO surrogate: max instead of min"),
    ("rl.py", 'adv = s["reward"] - value.detach()', 'adv = s["reward"]', IMPO,
     "advantage without the critic's baseline"),
    ("rl.py", 'ratio - 1 - (logp - s["old_logp"])', 'ratio - 1 + (logp - s["old_logp"])', IMPO,
     "IMPO KL: sign of log r flipped"),
    ("rl.py", "F.mse_loss(new_stm, stm_prev)", "F.mse_loss(new_stm.detach(), stm_prev)", IMPO,
     "memory regulariser detached from the write"),
    ("rl.py", 's["q_mask"], stm.detach())', 's["q_mask"], stm)', IMPO,
     "the critic's value loss trains the memory (missing detach)"),
    ("rl.py", "stm = model.update_memory(stm, ids, attn_mask, chunks)", "stm = model.update_memory(stm, q_ids, q_mask)",
     IMPO, "rollout writes the query without the model's answer"),
    ("rl.py", "t == len(turns[0]) - 1, cfg, tok)", "t == len(turns[0]), cfg, tok)", IMPO,
     "rollout never marks the probe (no recall reward)"),
    ("rl.py", "[None] < ans_len[:, None]", "[None] <= ans_len[:, None]", IMPO,
     "cosine reward averages one pad into the answer"),
    ("rl.py", "margin = beta * ((policy_w - ref_w) - (policy_l - ref_l))",
     "margin = beta * ((policy_w - ref_w) + (policy_l - ref_l))", DMPO, "dpo_loss: the rejected answer's term added"),
    ("rl.py", "for ids, attn_mask, _ in turns[:-1]:", "for ids, attn_mask, _ in turns:", DMPO,
     "dmpo writes the probe turn before scoring it (the answer leaks)"),
    ("rl.py", "ref = {k: answer_logprob(reference, *v,", "ref = {k: answer_logprob(model, *v,", DMPO,
     "dmpo: the reference is the policy itself"),
    ("rl.py", "return logp.view(targets.shape).sum(dim=1)", "return logp.view(targets.shape).mean(dim=1)", DMPO,
     "dmpo: answer log-probability averaged over every position"),
    ("rl.py", 'pairs = {"w": turns[-1], "l": collate_interactions(tok, wrong, cfg["seq_len"])}',
     'pairs = {"w": turns[-1], "l": turns[-1]}', DMPO, "dmpo: the rejected answer is the accepted one"),
    ("rl.py", "loss, metrics[\"anchor\"] = loss + cfg[\"dmpo_anchor\"] * anchor, anchor.detach()",
     "metrics[\"anchor\"] = anchor.detach()", DMPO, "dmpo: the anchor never joins the loss"),
    ("rl.py", "rejected[b] = said if said and said != episodes[b][\"gold\"] else batch[\"fallback\"][b]",
     "rejected[b] = batch[\"fallback\"][b]", DMPO, "dmpo: the model's own answers are never used"),
    ("data/memory_world.py", "rivals[\"binding\"] = second[3]", "rivals[\"binding\"] = value", DMPO,
     "world: the binding rival is the person's own value"),

    ("train_joint.py", "device=ed.device), 1)", "device=ed.device), -1)",
     [STAGES + "test_ed_swap_gives_a_share_of_rows_another_rows_memory_and_mask"],
     "ed_swap reads the next row, not the previous"),
    ("train_joint.py", "torch.where(swap[:, None], attn_mask[other], attn_mask))", "attn_mask)",
     [STAGES + "test_ed_swap_gives_a_share_of_rows_another_rows_memory_and_mask"], "ed_swap keeps the row's own mask"),
    ("train_joint.py", "memory, memory_mask = ed.detach(), attn_mask", "memory, memory_mask = ed, attn_mask",
     [STAGES + "test_joint_training_reads_a_detached_ed_so_only_the_mlm_loss_trains_the_encoder"],
     "joint: the decoder's loss shapes the encoder (missing detach)"),

    ("train_mlm.py", "attn_mask = ids != tok.pad_id", "attn_mask = ids == tok.pad_id", JOINT_RUN[:1],
     "mlm: padding mask inverted"),

    ("train_baseline.py", 'if set(cfg["distances"]) - set(have):', 'if not set(cfg["distances"]) & set(have):',
     BAD_SETTINGS, "baseline: a missing distance passes if another exists"),
    ("train_baseline.py", "return ids, next_token_targets(ids, ids != tok.pad_id)", "return ids, ids",
     ["tests/test_baseline.py"], "baseline lm: targets are the inputs (no shift)"),

    ("evaluate.py", 'return 1.0 / (len(values) - (ep["slot"] == "friend"))', "return 1.0 / len(values)", EVAL,
     "chance counts a person as their own friend"),
    ("evaluate.py", "if reset_before_probe:", "if not reset_before_probe:", RECALL + EVAL,
     "reset control and recall swapped"),
    ("evaluate.py", "for t in range(0 if reset_before_probe else len(turns[0]) - 1):",
     "for t in range(0 if reset_before_probe else len(turns[0])):", RECALL + EVAL,
     "the probe and its answer are written before it is asked"),
    ("evaluate.py", "for t in range(0 if reset_before_probe else len(turns[0]) - 1):",
     "for t in range(len(turns[0]) - 1 if reset_before_probe else 0):", RECALL + EVAL,
     "recall skips the writes, the control makes them"),
    ("evaluate.py", 'if per_k[k]["recall"] < level:', 'if per_k[k]["recall"] <= level:', EVAL,
     "span: a k recalled exactly at 90% is not kept"),
    ("evaluate.py", "        n = k\n", "        n += 1\n", EVAL, "span: facts kept counts the rows, not k"),
    ("evaluate.py", 'ep.get("binding") and\n', 'ep.get("binding") or\n', EVAL,
     "binding row: every long-range episode counts"),
    ("evaluate.py", '[:cfg["n_per_distance"]], cfg)\n        if cfg["chat_flow"]', '\n                    , cfg)\n        if cfg["chat_flow"]',
     EVAL, "binding row: n_per_distance ignored"),
    ("evaluate.py", 'results["paraphrase"][name] = {d: score(model, tok, [ep for ep in eps if ep["distance"] == d]',
     'results["paraphrase"][name] = {d: score(model, tok, [ep for ep in episodes if ep["distance"] == d]', EVAL,
     "paraphrase rows score the world's own phrasing"),
    ("data/memory_world.py", 'return held_out[hashlib.md5("|".join(map(str, key)).encode()).digest()[0] % len(held_out)]',
     'return rng.choice(varied)', ["tests/test_data_world.py"], "held-out phrasings are training phrasings"),
    ("data/memory_world.py", 'phrasing = "held-out" if phrasing == "held-out-questions" else phrasing',
     'phrasing = "canonical" if phrasing == "held-out-questions" else phrasing', ["tests/test_data_world.py"],
     "held-out-questions keeps the world's own questions"),
    ("data/memory_world.py", 'people = [rng.choice(NAMES)] * k if "one person" in layout else rng.sample(NAMES, k)',
     'people = rng.sample(NAMES, k) if "one person" in layout else [rng.choice(NAMES)] * k',
     ["tests/test_data_world.py"], "span: one person and several swapped"),
    ("model.py", ".softmax(dim=-2)  # (B, Hq, S, T)", ".softmax(dim=-1)  # (B, Hq, S, T)", MODEL,
     "competitive write: softmax over tokens, not slots"),
    ("model.py", "self.attn = memory_attention_heads(cfg, compete=cfg.write_competition)",
     "self.attn = memory_attention_heads(cfg)", MODEL, "write_competition ignored"),
    ("evaluate.py", 'if set(cfg["distances"]) - set(have):', 'if set(have) - set(cfg["distances"]):',
     EVAL + ["tests/test_bad_input.py::test_evaluate_refuses_bad_settings"], "distance check with its sets swapped"),
    ("evaluate.py", "token_loss(logits, targets).item() * counted", "token_loss(logits, targets).item()", EVAL,
     "answer perplexity: batch means not weighted by tokens"),

    ("chat.py", "query_ids + answer + [self.tok.eos_id]", "query_ids + answer", ["tests/test_chat.py"],
     "the written turn lacks [EOS]"),
    ("chat.py", "self.thread.join()", "self.thread.join(timeout=0.1)", ["tests/test_chat.py"],
     "the next answer may not wait for the write"),

    ("bench.py", "ids = torch.cat(history + [query])[None]", "ids = query[None]", ["tests/test_bench.py"],
     "baseline does not re-read the history"),
    ("bench.py", '{"padded": real / padded, "chunks": real / chunked}',
     '{"padded": real / chunked, "chunks": real / padded}', ["tests/test_bench.py"], "smat real-token shares swapped"),
    ("bench.py", "return 2 * 2 * B * Hq * T * T * hd // 2", "return 2 * 2 * B * Hq * T * T * hd",
     ["tests/test_bench.py"], "score FLOPs count the causal upper triangle"),

    ("demo.py", 'if key == "device":', 'if key != "device":',
     ["tests/test_bad_input.py::test_demo_refuses_unknown_options_before_the_first_stage"],
     "pass-through flags checked by the wrong rule"),

    ("convert_rxnn.py", '"rxnn": {"self": "qk", "read": "q", "write": "k"',
     '"rxnn": {"self": "qk", "read": "q", "write": "qk"', CONVERT,
     "convert: the memory write's queries reordered for RoPE in the rxnn convention"),
    ("convert_rxnn.py", "order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])",
     "order = torch.cat([torch.arange(1, hd, 2), torch.arange(0, hd, 2)])", CONVERT,
     "convert: RoPE rows reordered odd-first"),
    ("convert_rxnn.py", "return torch.cat([second, first], dim=dim)", "return torch.cat([first, second], dim=dim)",
     CONVERT, "convert: SwiGLU halves not swapped"),
    ('convert_rxnn.py', '"model.mean_stm_norm.weight", "copy"', '"model.mean_memory_norm_layers.{l}.weight", "copy"',
     CONVERT, "convert: interlayer keys/values normed by the layer's own query norm"),
    ("convert_rxnn.py", 'return "rxnn", "the encoder stores an STM buffer',
     'return "rxlm3", "the encoder stores an STM buffer', CONVERT, "convert: RoPE convention detected backwards"),
    ("convert_rxnn.py", "        if left:\n", "        if False:\n", CONVERT, "convert: tensors left over pass silently"),
    ("convert_rxnn.py", 'if choice == "check" and not torch.equal(e, d):', 'if False:', CONVERT,
     "convert: differing embeddings pass unchecked"),
    ("model.py", "return torch.addmm(self.b_down[e], glu(torch.addmm(self.b_gate_up[e], x, w1[e])), w2[e])",
     "return glu(torch.addmm(self.b_gate_up[e], x, w1[e])) @ w2[e]", CONVERT,
     "converted checkpoints: the experts' output biases dropped"),
    ("model.py", "(out if self.out_bias is None else out + self.out_bias)", "out", CONVERT,
     "converted checkpoints: rxlm's global MoE bias dropped"),
    ("engine.py", 'torch.bmm(torch.softmax(top, dim=-1)[:, None], L["b_down"][e])',
     'torch.bmm(torch.ones_like(top)[:, None], L["b_down"][e])', CONVERT,
     "FastStep, converted checkpoints: expert output biases not weighted by the router"),
    ("engine.py", "elif self.final_norm is not None:", "elif False:", CONVERT,
     "FastStep, converted checkpoints: the LayerNorm before the head skipped"),
    ("data/tokenizer.py",
     "return [i if i < self.vocab_size else self.unk_id for i in ids] if self.lacks_bytes else ids", "return ids",
     CONVERT, "converted tokenizer: bytes the vocabulary lacks are not [UNK]"),
    ("data/tokenizer.py", "return cls(ranks, specials, GPT2_PAT_STR, vocab_size)",
     "return cls(ranks, specials, PAT_STR, vocab_size)", CONVERT, "converted tokenizer: our pattern, not GPT-2's"),
    ("training.py", "tokenizer.state(),", '{"ranks": tokenizer.ranks},', CONVERT + ["tests/test_chat.py"],
     "checkpoint: a converted tokenizer's ids not saved"),

    # round four: the review with mutations the suite had not seen (caught, or missed and listed in the note)
    ("model.py", "dtype=torch.float32) / head_dim)", "dtype=torch.float32) / (head_dim // 2))", MODEL,
     "rope: frequencies divided by hd/2, not hd"),
    ("model.py", "x.roll(x.size(-1) // 2, dims=-1)", "x.roll(1, dims=-1)", MODEL,
     "apply_rope: partner is the next element (interleaved layout), not the other half"),
    ("model.py", "x = x.view(x.size(0), x.size(1), n, self.hd).transpose(1, 2)",
     "x = x.view(x.size(0), n, x.size(1), self.hd)", MODEL, "attention: heads split by a view without the transpose"),
    ("model.py", "self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_q * self.hd))",
     "self.out_proj(y.reshape(B, T, self.n_q * self.hd))", MODEL, "attention: heads merged without transposing back"),
    ("model.py", "return self.heads(k, self.n_kv, k_rope, self.k_norm), self.heads(v, self.n_kv)",
     "return self.heads(k, self.n_kv, k_rope), self.heads(v, self.n_kv)", MODEL,
     "QK-norm: cross-attention keys (the STM's, the ED's) not normed"),
    ("model.py", "probs = F.softmax(self.router(x).float(), dim=-1)",
     "probs = F.softmax(self.router(x).float(), dim=0)", MODEL,
     "moe: router softmax over the tokens instead of the experts"),
    ("model.py", "token_of_slot = order // self.top_k", "token_of_slot = order // self.n_experts", MODEL,
     "moe: slot -> token divides by the expert count"),
    ("model.py", "return x + self.ff(self.norm2(x))", "return x + self.ff(self.norm1(x))", MODEL + CHUNKS,
     "encoder: feed-forward reads the attention's norm (norm1) instead of its own"),
    ("model.py", "m = (stm + update).mean(dim=-1)  # (B, S)", "m = update.mean(dim=-1)  # (B, S)", MODEL,
     "per-slot / linear gate looks at the update only, not STM + update"),
    ("model.py", "self.b = nn.Parameter(torch.full((n_slots,), -1.0))", "self.b = nn.Parameter(torch.zeros(n_slots))",
     MODEL, "per-slot gates start at 0.5, not small"),
    ("model.py", "m = torch.sigmoid(self.mix)", "m = self.mix", MODEL,
     "self-interlayer: the mix is used without its sigmoid"),
    ("model.py", "stm_mean = stm.mean(dim=0)  # (B, S, D)", "stm_mean = stm.mean(dim=1)  # (B, S, D)", MODEL + CHUNKS,
     "interlayer memory attention: mean over the batch instead of the layers"),
    ("model.py", "token_mask=None if attn_mask is None else take(attn_mask, rows)[:, :n])", "token_mask=None)",
     MODEL + CHUNKS, "decode: MoE routing statistics count padding"),
    ("model.py", "pooled = (h * attn_mask[..., None]).sum(dim=1) / attn_mask.sum(dim=1, keepdim=True)",
     "pooled = (h * attn_mask[..., None]).sum(dim=1) / attn_mask.size(1)",
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "critic: query pooled over the padded length, not its real tokens"),
    ("model.py", '"decoder_active": dec - c.n_layers * (c.n_experts - c.top_k) * expert',
     '"decoder_active": dec - (c.n_experts - c.top_k) * expert', MODEL,
     "param_counts: inactive experts subtracted for one layer only"),

    ("engine.py", "if temperature <= 0:", "if temperature < 0:", GENERATION,
     "temperature 0 is not greedy (divides by zero)"),
    ("engine.py", "logits.sort(dim=-1, descending=True)", "logits.sort(dim=-1, descending=False)", GENERATION,
     "top_p keeps the least likely tokens"),
    ("engine.py", "read=[(k[:, :p + 1].transpose(1, 2), v[:, :p + 1]) for p in positions.tolist()]",
     "read=[(k[:, :p].transpose(1, 2), v[:, :p]) for p in positions.tolist()]", GENERATION,
     "FastStep: a token does not attend to itself"),
    ("engine.py", "if gather is None else not gather", "if gather is None else gather", GENERATION,
     "FastStep: the gather flag inverted"),
    ("engine.py", "torch.bmm(torch.softmax(top, dim=-1).view(B, 1, -1)",
     "torch.bmm(torch.softmax(top, dim=0).view(B, 1, -1)", GENERATION,
     "FastStep (batched/GPU path): expert weights softmaxed over the batch"),
    ("engine.py", "cq=cq if c_rot is not None or ca.q_norm is not None else cq * hd ** -0.5",
     "cq=cq if c_rot is not None else cq * hd ** -0.5", GENERATION,
     "FastStep: memory read scaled twice with QK-norm and memory_rope off"),
    ("engine.py", "torch.ones(T, T, dtype=torch.bool, device=ids.device).tril() & attn_mask",
     "torch.ones(T, T, dtype=torch.bool, device=ids.device) & attn_mask", GENERATION,
     "padded prompts attend to later prompt tokens (no causal mask)"),

    ("training.py", '(step - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])',
     'step / max(1, cfg["max_iters"] - cfg["warmup_iters"])', PLUMBING,
     "cosine progress counted from step 0, not from the end of warmup"),
    ("training.py", 'loss_fn(model, get_batch("val", step, g_cpu), step, g)',
     'loss_fn(model, get_batch("train", step, g_cpu), step, g)', PLUMBING + RESUME,
     "evaluation reads training batches, not the validation split"),
    ("training.py", 'if ckpt["stage"] == stage:', 'if ckpt["stage"]:', PLUMBING + RESUME,
     "resume from another stage's checkpoint in out_dir"),
    ("training.py", 'step, metrics = ckpt["step"], ckpt["metrics"]',
     'step, metrics = ckpt["step"] + 1, ckpt["metrics"]', RESUME, "resume skips a step"),
    ("training.py", "    optimizer.zero_grad(set_to_none=True)\n", "", PLUMBING + RESUME,
     "gradients never zeroed: they accumulate over steps"),
    ("training.py", 'totals[k] = totals.get(k, 0.0) + float(v) / cfg["eval_iters"]',
     "totals[k] = totals.get(k, 0.0) + float(v)", PLUMBING + RESUME, "eval metrics summed over batches, not averaged"),

    ("cli.py", "isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool)",
     "isinstance(old, float) and isinstance(value, int)", PLUMBING + BAD_SETTINGS + [FORMULAS],
     "configure: a bool is accepted for a float setting (--lr=True)"),
    ("cli.py", 'POSITIVE = (lambda v: not isinstance(v, bool) and v > 0), "> 0"',
     'POSITIVE = (lambda v: not isinstance(v, bool) and v >= 0), "> 0"', PLUMBING + BAD_SETTINGS + [FORMULAS],
     "POSITIVE accepts 0 (lr=0)"),
    ("cli.py", "all(isinstance(d, int) and d > 0 for d in v)", "all(isinstance(d, int) and d >= 0 for d in v)",
     BAD_SETTINGS + ["tests/test_bad_input.py::test_evaluate_refuses_bad_settings"], "DISTANCES accepts distance 0"),
    ("cli.py", "self.step = max(1, -(-(self.total or 0) // 10))", "self.step = max(1, (self.total or 0) // 10)",
     ["tests/test_house.py"], "progress: a line every floor(total/10) items (more than ten lines)"),

    ("scores.py", "score = bp * torch.exp(torch.stack(log_p).mean(dim=0))",
     "score = bp * torch.exp(torch.stack(log_p).sum(dim=0))", BLEU,
     "bleu: product of the precisions, not their geometric mean"),
    ("scores.py", "g = seq.unfold(1, n, 1)", "g = seq.unfold(1, n, n)", BLEU, "bleu: non-overlapping n-grams only"),
    ("scores.py", "for n in range(1, max_n + 1):", "for n in range(1, max_n):", BLEU,
     "bleu: the max_n-grams left out (BLEU-3)"),

    ("rl.py", 'r = r + cfg["mrl_recall_weight"] * exact_match', 'r = r + cfg["mrl_bleu_weight"] * exact_match',
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "reward: the probe's exact match weighted by the BLEU weight"),
    ("rl.py", '.item() < cfg["mrl_reset_prob"]', '.item() > cfg["mrl_reset_prob"]',
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "rollout: the STM reset happens with probability 1 - mrl_reset_prob"),
    ("rl.py", 'm = s["ans_mask"][:, :-1]', 'm = s["ans_mask"][:, 1:]',
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "impo: the sampled-token mask shifted by one against the log-probs"),
    ("rl.py", "adv = (adv - adv.mean()) / (adv.std() + 1e-6)", "adv = adv / (adv.std() + 1e-6)",
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "impo: advantages scaled but not centred"),
    ("rl.py", "return total / n, metrics", "return total, metrics",
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "impo: loss summed over turns, not averaged"),
    ("rl.py", 'stm_prev = stm.detach() if cfg["mrl_detach_stm"] else stm',
     'stm_prev = stm if cfg["mrl_detach_stm"] else stm.detach()',
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"], "mrl_detach_stm inverted"),
    ("rl.py", "ratio = torch.exp(logp - old_logp)", "ratio = torch.exp(old_logp - logp)",
     IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"], "PPO ratio inverted (pi_old / pi)"),
    ("rl.py", "return -F.logsigmoid(margin).mean(), margin.detach()",
     "return F.logsigmoid(-margin).mean(), margin.detach()", DMPO,
     "dpo_loss: sign slip, log sigmoid(-margin) instead of -log sigmoid(margin)"),

    ("train_mlm.py", 'n.split(".")[0] in ("embed", "encoder", "mlm_head")',
     'n.split(".")[0] in ("encoder", "mlm_head")', ["tests/test_train_stages.py"],
     "mlm: the shared embedding is not trained"),
    ("train_mlm.py", 'mlm_inputs(ids, attn_mask, tok.mask_id, cfg["mask_prob"], g)',
     'mlm_inputs(ids, attn_mask, tok.pad_id, cfg["mask_prob"], g)', ["tests/test_train_stages.py", "tests/test_stage_data.py"],
     "mlm: masked tokens replaced by [PAD] instead of [MASK]"),

    ("train_joint.py", 'loss = ar_loss + mlm_loss + cfg["aux_weight"] * aux_loss',
     'loss = ar_loss + cfg["aux_weight"] * aux_loss', ["tests/test_train_stages.py"],
     "joint: the MLM loss left out of the sum"),
    ("train_joint.py", 'if not n.startswith("memory_attention.")]', 'if not n.startswith("mlm_head.")]',
     ["tests/test_train_stages.py", "tests/test_stage_data.py"],
     "joint: the MLM head is frozen (the memory attention's filter copied from train_mrl)"),
    ("train_joint.py", 'splits = {"val": records[:n_val], "train": records[n_val:]}',
     'splits = {"val": records[:n_val], "train": records}', ["tests/test_train_stages.py", "tests/test_stage_data.py"],
     "sft: validation records trained on"),
    ("train_joint.py", "generator=g, device=ed.device) < share", "generator=g, device=ed.device) > share",
     ["tests/test_train_stages.py"], "ed_swap: 1 - share of the rows swapped"),

    ("train_mrl.py", 'w = max(cfg["batch_size"], len(pool) // cfg["length_buckets"])',
     'w = min(cfg["batch_size"], len(pool) // cfg["length_buckets"])', [FORMULAS] + SMAT,
     "episode_batch: the window is one batch wide"),
    ("train_mrl.py", "(0.9 if t == 0 else 0.5 - 0.05 * t)", "(0.9 if t == 0 else 0.5 + 0.05 * t)",
     [FORMULAS, MRL + "test_memory_attention_pretraining_loss_falls", "tests/test_stage_data.py"], "mem: the new data's share grows over turns"),
    ("train_mrl.py", "        stm = new.detach()\n", "        stm = new\n",
     [FORMULAS, MRL + "test_memory_attention_pretraining_loss_falls", "tests/test_stage_data.py"],
     "mem: missing detach, every turn's loss trains the earlier writes"),
    ("train_mrl.py", 'total = total + loss + cfg["smat_aux_weight"] * aux_loss',
     'total = loss + cfg["smat_aux_weight"] * aux_loss', SMAT + RECALL + [FORMULAS],
     "smat: only the probe turn's loss is kept"),
    ("train_mrl.py", 'extra_modules={"critic": critic}, ', "",
     [MRL + "test_train_mrl_runs_every_phase_and_chains_checkpoints"],
     "mrl: the critic is not checkpointed or restored"),

    ("train_baseline.py", 'episodes = [ep for ep in episodes if ep["distance"] in cfg["distances"]]',
     'episodes = [ep for ep in episodes if ep["distance"] not in cfg["distances"]]', ["tests/test_baseline.py", "tests/test_stage_data.py"],
     "baseline: trains on the distances it was told to leave out"),
    ("train_baseline.py", 'splits = {"val": episodes[:n_val], "train": episodes[n_val:]}',
     'splits = {"val": episodes[:n_val], "train": episodes}', ["tests/test_baseline.py", "tests/test_stage_data.py"],
     "baseline: validation episodes trained on"),

    ("evaluate.py", 'max(1, sum(ep["kind"] == k for ep in episodes)) for k in KINDS}', "len(episodes) for k in KINDS}",
     EVAL, "recall by kind divided by all episodes, not that kind's"),
    ("evaluate.py", 'if per_k[k]["recall"] < level:\n            break',
     'if per_k[k]["recall"] < level:\n            continue', EVAL, "kept: a k below 90% does not stop the count"),
    ("evaluate.py", "ans[b, :lengths[b]].tolist()", "ans[b].tolist()", EVAL,
     "answer: tokens after [EOS] join the answer text"),
    ("evaluate.py", "stm = model.update_memory(stm, ids, attn_mask)", "stm = model.update_memory(stm, ids)", EVAL,
     "answer perplexity: turns written into memory with their padding"),

    ("chat.py", "norms = self.stm[:, 0].norm(dim=-1).mean(dim=-1)", "norms = self.stm[:, 0].norm(dim=-1).mean(dim=0)",
     ["tests/test_chat.py"], "/memory: norms averaged over layers, one line per slot"),
    ("chat.py", 'top_k=self.cfg["top_k"] or None', 'top_k=self.cfg["top_k"]', ["tests/test_chat.py"],
     "chat: top_k=0 (off) passed on as k=0"),

    ("demo.py", 'f"--phases=smat,{final}"', '"--phases=smat,mrl"',
     ["tests/test_bad_input.py::test_demo_refuses_unknown_options_before_the_first_stage"],
     "demo --dmpo still trains MRL (and evaluates a checkpoint never written)"),
    ("demo.py", "            return 1\n", "            continue\n",
     ["tests/test_bad_input.py::test_demo_refuses_unknown_options_before_the_first_stage"],
     "demo: a failed stage does not stop the run"),

    ("bench.py", "tokens=query.numel() + len(answer) + interaction.size(1))", "tokens=query.numel() + len(answer))",
     ["tests/test_bench.py"], "conversation: RxT's memory update tokens not counted"),
    ("bench.py", "history += [query, torch.cat(answer)]", "history += [query]", ["tests/test_bench.py"],
     "conversation: the baseline re-reads the queries but not its answers"),
    ("bench.py", "base = 2 * L * Hkv * hd * history * kv_bytes", "base = L * Hkv * hd * history * kv_bytes",
     ["tests/test_bench.py"], "memory: baseline KV cache counts keys only"),
    ("bench.py", "history = (n - 1) * per_turn_tokens", "history = n * per_turn_tokens", ["tests/test_bench.py"],
     "memory: turn N's history counts turn N itself"),

    ("data/loaders.py", "order = sorted(range(len(lengths)), key=lengths.__getitem__)",
     "order = list(range(len(lengths)))", CHUNKS + LOADERS, "length_chunks: rows grouped without sorting by length"),
    ("data/loaders.py", "answer[b, start:len(row)] = True", "answer[b, start:] = True", LOADERS + CHUNKS,
     "collate_interactions: padding after [EOS] counted as answer targets"),
    ("data/loaders.py", "([] if a and a[-1] == tok.eos_id else [tok.eos_id])", "[tok.eos_id]",
     LOADERS + IMPO + [MRL + "test_impo_step_moves_the_policy_towards_rewarded_answers"],
     "join_answers: a second [EOS] after an answer that has one"),
    ("data/loaders.py", '(k in ("other", "own") or k in rivals)', "k in rivals", DMPO,
     "rejected_answer: other and own never drawn"),

    ("data/memory_world.py", "if v != p and v not in avoid", "if v not in avoid",
     ["tests/test_data_world.py", "tests/test_dmpo.py::test_the_world_records_each_episodes_rivals"],
     "random_value: someone can be their own best friend"),
    ("data/memory_world.py", ' and len({(f[0], f[1], f[2]) for f in facts}) == len(facts)', "",
     ["tests/test_data_world.py", "tests/test_dmpo.py::test_the_world_records_each_episodes_rivals"],
     "question_turn: one query may give a person two values for one slot"),
    ("data/memory_world.py", "binding = second[0] != p and second[3] != value", "binding = second[0] != p",
     ["tests/test_data_world.py", "tests/test_dmpo.py::test_the_world_records_each_episodes_rivals"],
     "episodes marked binding although both people share the value"),
    ("data/memory_world.py", '"gold": gold, "distance": len(turns), "kind": "span"',
     '"gold": gold, "distance": k, "kind": "span"',
     ["tests/test_data_world.py", "tests/test_dmpo.py::test_the_world_records_each_episodes_rivals"] + EVAL,
     "span: distance is k even when all facts are in one turn"),
    ("data/memory_world.py", 'tokenize_to_bin(stories[:-n_val], tok, path("train.bin"))',
     'tokenize_to_bin(stories, tok, path("train.bin"))',
     ["tests/test_data_world.py", "tests/test_dmpo.py::test_the_world_records_each_episodes_rivals"],
     "world: validation stories in train.bin"),

    ("data/tokenizer.py", "return Counter(zip(ids, ids[1:]))", "return Counter(zip(ids[::2], ids[1::2]))",
     ["tests/test_data_tokenizer.py"], "pair counts skip the overlapping pairs"),
    ("data/tokenizer.py", "0 <= i < self.vocab_size else self.unk_id", "0 <= i <= self.vocab_size else self.unk_id",
     ["tests/test_data_tokenizer.py"], "decode: the id just past the vocab is not read as [UNK]"),
    ("data/tokenizer.py", "                chunk += f.readline()\n", "", ["tests/test_data_tokenizer.py"],
     "read_texts cuts words at chunk borders"),
    ("data/tokenizer.py", "vocab_size=cli.at_least(256 + len(SPECIAL_TOKENS))", "vocab_size=cli.at_least(256)",
     ["tests/test_data_tokenizer.py",
      "tests/test_bad_input.py::test_data_modules_refuse_bad_flags_and_missing_or_empty_input"],
     "CLI: vocab_size below 264 passes the check (then an assert)"),

    ("data/tinystories.py", "total = have + int(length) if length", "total = int(length) if length",
     ["tests/test_data_tinystories.py"], "download: a resumed download's total forgets the bytes it had"),
    ("data/tinystories.py", 'open(part, "ab" if have else "wb")', 'open(part, "wb")',
     ["tests/test_data_tinystories.py"], "download: a resumed .part is overwritten, not appended to"),
    ("data/tinystories.py", "                if story:\n                    yield story", "                yield story",
     ["tests/test_data_tinystories.py"], "iter_stories yields empty stories"),
    ("data/tinystories.py", 'tokenize_to_bin(iter_stories(valid_path), tok, os.path.join(out_dir, "val.bin")',
     'tokenize_to_bin(iter_stories(train_path), tok, os.path.join(out_dir, "val.bin")',
     ["tests/test_data_tinystories.py"], "prepare: val.bin tokenized from the training file"),
    # round five's review: mutations the suite had not seen (28 of 40 caught by their tests; tests were then added
    # for all twelve misses, each checked against its mutant)
    ('model.py', 'key_mask = None if attn_mask is None else attn_mask[:, None, None, :]', 'key_mask = None',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_chunks.py'], 'encoder: padding mask dropped, real tokens attend to [PAD]'),
    ('model.py', '(probs * real[:, None]).sum(dim=0)])', 'probs.sum(dim=0)])',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_chunks.py'], 'moe: router probability mass in the routing statistics counts padding tokens'),
    ('model.py', 'weights.flatten()[order, None]', 'weights.flatten()[:, None]',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py'], 'moe: routing weights not permuted like the expert-sorted slots'),
    ('model.py', 'return (a / (a.sum(dim=-1, keepdim=True) + 1e-6)) @ v', 'return a @ v',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py'], 'competitive write: slots sum the tokens they won instead of averaging them'),
    ('model.py', 'g = torch.sigmoid(self.lin(stm + update))  # (B, S, D)', 'g = torch.sigmoid(self.lin(update))  # (B, S, D)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py'], 'per-element gate reads the update only, not STM + update'),
    ('model.py', 'layer.cross_attn.keys_values(layer.stm_norm(memory[l]))', 'layer.cross_attn.keys_values(memory[l])',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py'], 'decoder: memory K/V projected from the raw STM, stm_norm skipped'),
    ('model.py', 'h = self.encoder(self.embed(ids), attn_mask)[-1]', 'h = self.encoder(self.embed(ids), attn_mask)[0]',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_rl_mechanics.py'], "critic: reads the encoder's first layer instead of its last"),
    ('model.py', 'f = slots / slots.sum(dim=-1, keepdim=True).clamp(min=1)', 'f = slots / slots.sum().clamp(min=1)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_chunks.py'], "balancing_loss: f_e normalised over every layer's slots, not per layer"),
    ('engine.py', 'kth = logits.topk(top_k, dim=-1).values[:, -1:]', 'kth = logits.topk(top_k, dim=-1).values[:, :1]',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_precision.py::test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype'], 'top_k: threshold at the most likely token, so sampling is greedy'),
    ('engine.py', 'partner = col // hd * hd + (col % hd + hd // 2) % hd', 'partner = (col + hd // 2) % hd',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_precision.py::test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype'], 'FastStep rotations: RoPE partner column loses its head offset'),
    ('engine.py', 'w = [math.exp(t - top[0]) for t in top]', 'w = [math.exp(top[0] - t) for t in top]',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_precision.py::test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype'], "FastStep (CPU, one row): expert weights' softmax with the sign flipped"),
    ('training.py', 'decay = [p for p in params if p.dim() >= 2]', 'decay = [p for p in params if p.dim() > 2]',
     ['tests/test_training_plumbing.py', 'tests/test_precision.py'], 'optimizer: 2-D matrices get no weight decay (only the stacked experts do)'),
    ('training.py', 'if step < cfg["warmup_iters"]:', 'if step <= cfg["warmup_iters"]:',
     ['tests/test_training_plumbing.py'], 'warmup one step too long: lr overshoots at step warmup_iters'),
    ('training.py', ' or step + 1 == cfg["max_iters"]:', ':',
     ['tests/test_training_plumbing.py', 'tests/test_baseline.py'], 'no evaluation at the end of a run (only every eval_interval)'),
    ('train_mlm.py', '_, loss, acc = model.mlm(masked, attn_mask, targets)', '_, loss, acc = model.mlm(ids, attn_mask, targets)',
     ['tests/test_stage_data.py'], 'mlm: the encoder reads the unmasked text'),
    ('train_joint.py', 'model.decode(ids, memory, memory_mask, targets, attn_mask, chunks)', 'model.decode(ids, memory, None, targets, attn_mask, chunks)',
     ['tests/test_stage_data.py', 'tests/test_train_stages.py'], "joint/sft: the decoder reads the ED's padding (memory mask dropped)"),
    ('train_joint.py', 'memory = memory + cfg["noise_std"] * torch.randn(', 'memory = cfg["noise_std"] * torch.randn(',
     ['tests/test_stage_data.py', 'tests/test_train_stages.py'], 'joint: the fake-STM noise replaces the ED instead of being added to it'),
    ('train_mrl.py', 'new = model.memory_attention(noisy, ed, attn_mask)', 'new = model.memory_attention(noisy, ed)',
     ['tests/test_formulas_and_options.py', 'tests/test_mrl.py::test_memory_attention_pretraining_loss_falls', 'tests/test_stage_data.py'], "mem: the write reads the ED's padding"),
    ('train_mrl.py', 'chunks[t - 1])', 'chunks[t])',
     ['tests/test_chunks.py::test_smat_episode_in_chunks_gives_the_padded_loss_and_gradients', 'tests/test_mrl_fixes.py', 'tests/test_formulas_and_options.py'], "smat: the previous turn is written with the current turn's chunks"),
    ('train_baseline.py', 'if cfg["seq_len"] > model.cfg.seq_len:', 'if cfg["seq_len"] >= model.cfg.seq_len:',
     ['tests/test_baseline.py', 'tests/test_stage_data.py'], "baseline: a seq_len equal to the model's context is refused"),
    ('rl.py', 'ratio.clamp(1 - eps, 1 + eps) * adv', 'ratio.clamp(max=1 + eps) * adv',
     ['tests/test_rl_mechanics.py', 'tests/test_mrl_fixes.py', 'tests/test_mrl.py::test_clipping_stops_the_gain_from_moving_the_policy_further_than_eps'], 'PPO clip: the lower bound 1 - eps dropped'),
    ('rl.py', '- cfg["mrl_entropy_coef"] * (entropy * m).sum() / tokens', '+ cfg["mrl_entropy_coef"] * (entropy * m).sum() / tokens',
     ['tests/test_rl_mechanics.py', 'tests/test_mrl_fixes.py', 'tests/test_mrl.py::test_impo_step_moves_the_policy_towards_rewarded_answers'], 'impo: entropy penalised instead of rewarded'),
    ('rl.py', 'anchor = (policy["n"] - ref["n"]).abs().mean()', 'anchor = (policy["n"] - ref["n"]).mean()',
     ['tests/test_dmpo.py'], 'dmpo anchor: signed mean of log pi/ref, not its absolute value'),
    ('evaluate.py', 'if episodes[0]["distance"] > 0 and not kw.get("own_answers"):', 'if episodes[0]["distance"] >= 0 and not kw.get("own_answers"):',
     ['tests/test_evaluation_rows.py', 'tests/test_mrl.py::test_memory_eval_reports_recall_and_control_by_distance'], 'score: in-context (distance 0) rows get a reset control'),
    ('evaluate.py', 'memory, cfg["max_turn_answer"])', 'memory, cfg["max_answer"])',
     ['tests/test_evaluation_rows.py', 'tests/test_mrl.py::test_memory_eval_reports_recall_and_control_by_distance'], "chat flow: earlier turns answered within the probe's one-word budget"),
    ('evaluate.py', 'eps = [ep for ep in episodes if ep["distance"] == d][:cfg["n_per_distance"]]', 'eps = [ep for ep in episodes if ep["distance"] == d]',
     ['tests/test_evaluation_rows.py', 'tests/test_mrl.py::test_memory_eval_reports_recall_and_control_by_distance'], 'answer perplexity ignores n_per_distance'),
    ('evaluate.py', 'ep["kind"] == "long-range"]', 'ep["kind"] != "cumulative"]',
     ['tests/test_evaluation_rows.py', 'tests/test_mrl.py::test_memory_eval_reports_recall_and_control_by_distance'], 'binding row: binding overwrite episodes counted too'),
    ('data/loaders.py', 'ids.masked_fill(~chosen, IGNORE)', 'ids.masked_fill(chosen, IGNORE)',
     ['tests/test_data_loaders.py', 'tests/test_stage_data.py'], 'mlm_inputs: targets on the unmasked tokens instead of the masked ones'),
    ('data/loaders.py', 'prompt = render_query(tok, query, max(3, max_len - len(a)))', 'prompt = render_query(tok, query, max(3, max_len))',
     ['tests/test_data_loaders.py', 'tests/test_data_tokenizer.py'], 'render_interaction: a long query is not shortened and pushes the answer out'),
    ('data/loaders.py', 'pools["val" if i < n_val else "train"]', 'pools["val" if i <= n_val else "train"]',
     ['tests/test_data_loaders.py', 'tests/test_formulas_and_options.py'], 'episode_pools: one episode too many in validation'),
    ('data/memory_world.py', 'rivals["overwrite"] = seen[-2]', 'rivals["overwrite"] = seen[0]',
     ['tests/test_data_world.py', 'tests/test_dmpo.py::test_the_world_records_each_episodes_rivals'], 'overwrite rival: the first value, not the one before the last change'),
    ('data/tokenizer.py', 'if i < n - 1 and ids[i] == pair[0]', 'if i < n - 2 and ids[i] == pair[0]',
     ['tests/test_data_tokenizer.py'], 'merge_word: a pair at the end of a word is never merged'),
    ('data/tinystories.py', 'if total is not None and size != total:', 'if total is not None and size > total:',
     ['tests/test_data_tinystories.py'], 'download: a short download passes as complete'),
    ('cli.py', 'all(DISTANCES[0](entry) for entry in v)', 'any(DISTANCES[0](entry) for entry in v)',
     ['tests/test_bad_input.py', 'tests/test_training_plumbing.py'], 'CURRICULUM: one good entry lets bad ones pass'),
    ('cli.py', '            ok = False\n', '            ok = True\n',
     ['tests/test_bad_input.py', 'tests/test_training_plumbing.py'], 'check: a value whose rule raises (wrong type) passes'),
    ('convert_rxnn.py', 'return d if choice == "decoder" else e', 'return e if choice == "decoder" else d',
     ['tests/test_convert_rxnn.py'], "convert: --embedding=encoder/decoder takes the other component's copy"),
    ('convert_rxnn.py', 'return swap_halves(tensors[0], dim=0)', 'return swap_halves(tensors[0], dim=-1)',
     ['tests/test_convert_rxnn.py'], 'convert: encoder SwiGLU weight halves swapped along the input dim'),
    ('convert_rxnn.py', '"rxlm3": {"self": "qk", "read": "qk"', '"rxlm3": {"self": "qk", "read": "q"',
     ['tests/test_convert_rxnn.py'], "convert: rxlm3 memory read's keys not reordered for RoPE"),
    ('chat.py', 'if n + 3 > len(query_ids):', 'if n + 3 >= len(query_ids):',
     ['tests/test_chat.py'], 'chat: every input reported as truncated'),
    ('bench.py', 'update=0.0, tokens=ids.size(1) + len(answer))', 'update=0.0, tokens=ids.size(1))',
     ['tests/test_bench.py'], "conversation: the baseline's generated tokens not counted"),
    # round six's review (40 mutations nobody had seen; 26 caught before, tests added for the other 14)
    ('model.py', 'x = x + self.attn(self.norm1(x), q_rope=rope_cs, k_rope=rope_cs, attn_mask=attn_mask)',
     'x = x + self.attn(self.norm1(x), q_rope=rope_cs, k_rope=None, attn_mask=attn_mask)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_chunks.py'],
     'encoder: self-attention keys not rotated (queries are)'),
    ('model.py', 'return self.lm_head(self.norm(x)), torch.stack(routing)',
     'return self.lm_head(x), torch.stack(routing)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_precision.py::test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype'],
     'decoder: the final norm skipped before the LM head'),
    ('model.py', 'g = torch.sigmoid(self.w)  # (S, 1)', 'g = self.w  # (S, 1)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py'],
     'static gate: the learned constant used without its sigmoid'),
    ('model.py', 'real = probs.new_ones(len(x)) if token_mask is None',
     'real = probs.new_zeros(len(x)) if token_mask is None',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_chunks.py'],
     'moe: without a token mask no token is counted in the routing statistics'),
    ('model.py', 'for w in (m.w_gate_up, m.w_down):', 'for w in (m.w_gate_up,):',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py'],
     "init_weights: the experts' down matrices left uninitialised (torch.empty)"),
    ('model.py', 'routing = routing + r', 'routing = r',
     ['tests/test_chunks.py', 'tests/test_model.py', 'tests/test_formulas_and_options.py'],
     "decode in chunks: balancing loss from the last chunk's routing statistics only"),
    ('model.py', 'return {"encoder": emb + count_params(self.encoder),',
     'return {"encoder": count_params(self.encoder),', ['tests/test_model.py', 'tests/test_formulas_and_options.py'],
     'param_counts: the encoder counted without the shared embedding (unlike the model cards)'),
    ('training.py', '    torch.manual_seed(cfg["seed"])\n', '',
     ['tests/test_train_stages.py::test_interrupted_run_resumes_to_the_same_weights', 'tests/test_training_plumbing.py'],
     "setup: the global seed not set, so a fresh model's init is not reproducible"),
    ('training.py', '{"params": no_decay, "weight_decay": 0.0}',
     '{"params": no_decay, "weight_decay": cfg["weight_decay"]}',
     ['tests/test_training_plumbing.py', 'tests/test_precision.py'], 'optimizer: norms, biases and gates decayed too'),
    ('training.py', 'if cfg["resume"] and os.path.isfile(path):', 'if os.path.isfile(path):',
     ['tests/test_training_plumbing.py'], 'resume=False still resumes from out_dir/ckpt.pt'),
    ('training.py', 'stage=stage, step=step + 1, metrics=metrics', 'stage=stage, step=step, metrics=metrics',
     ['tests/test_train_stages.py::test_interrupted_run_resumes_to_the_same_weights', 'tests/test_training_plumbing.py'],
     'mid-run checkpoint records the step just done: a resumed run repeats it'),
    ('train_mrl.py', 'noisy = stm + cfg["mem_noise"] * torch.randn(stm.shape, generator=g, device=stm.device)',
     'noisy = stm',
     ['tests/test_formulas_and_options.py', 'tests/test_mrl.py::test_memory_attention_pretraining_loss_falls', 'tests/test_stage_data.py'],
     "mem: the write's input carries no noise (mem_noise ignored there)"),
    ('train_mrl.py', 'if not n.startswith("mlm_head.")] + list(critic.parameters())',
     'if not n.startswith("mlm_head.")]', ['tests/test_rl_mechanics.py'],
     "mrl: the critic's parameters are not given to the optimizer (it never learns)"),
    ('train_mrl.py', 'warmup_iters=min(cfg["warmup_iters"], max(1, n // 10)))', 'warmup_iters=cfg["warmup_iters"])',
     ['tests/test_rl_mechanics.py'], 'phases: a short phase keeps the whole warmup and never reaches its lr'),
    ('rl.py', '        stm = new_stm\n', '        stm = new_stm.detach()\n',
     ['tests/test_rl_mechanics.py', 'tests/test_mrl_fixes.py', 'tests/test_mrl.py::test_clipping_stops_the_gain_from_moving_the_policy_further_than_eps', 'tests/test_mrl.py::test_the_advantage_is_the_reward_minus_the_critics_value', 'tests/test_mrl.py::test_the_memory_regulariser_alone_trains_the_write_to_change_less', 'tests/test_mrl.py::test_impo_step_moves_the_policy_towards_rewarded_answers'],
     'impo: the next turn reads a detached memory, so the policy loss never trains the write'),
    ('rl.py', '+ cfg["mrl_value_coef"] * F.mse_loss(value, s["reward"])',
     '+ cfg["mrl_value_coef"] * F.mse_loss(value.detach(), s["reward"])', ['tests/test_rl_mechanics.py'],
     'impo: the value loss detached, the critic gets no gradient'),
    ('rl.py', 'pad_rows([tok.encode(tr[t]["answer"]) + [tok.eos_id] for tr in turns], tok.pad_id)',
     'pad_rows([tok.encode(tr[t]["answer"]) for tr in turns], tok.pad_id)',
     ['tests/test_rl_mechanics.py', 'tests/test_mrl_fixes.py', 'tests/test_mrl.py::test_clipping_stops_the_gain_from_moving_the_policy_further_than_eps', 'tests/test_mrl.py::test_the_advantage_is_the_reward_minus_the_critics_value', 'tests/test_mrl.py::test_the_memory_regulariser_alone_trains_the_write_to_change_less', 'tests/test_mrl.py::test_impo_step_moves_the_policy_towards_rewarded_answers'],
     'rollout: reference answers lack [EOS], so no answer is ever an exact match'),
    ('rl.py', 'said = tok.decode([t for t in ans[i, :ans_len[i]].tolist() if t != tok.eos_id]).strip()',
     'said = tok.decode(ans[i, :ans_len[i]].tolist()).strip()', ['tests/test_dmpo.py'],
     'dmpo own answers: [EOS] kept in the decoded text, so a right answer is rejected'),
    ('train_joint.py', 'torch.where(swap[None, :, None, None], ed[:, other], ed)',
     'torch.where(swap[None, :, None, None], ed, ed)',
     ['tests/test_train_stages.py::test_ed_swap_gives_a_share_of_rows_another_rows_memory_and_mask', 'tests/test_chunks.py::test_joint_decode_reading_another_rows_ed_in_chunks_equals_the_padded_batch'],
     'ed_swap swaps the mask but not the ED'),
    ('train_mlm.py', 'return get_lm_batch(os.path.join(cfg["data_dir"], f"{split}.bin")',
     'return get_lm_batch(os.path.join(cfg["data_dir"], "train.bin")', ['tests/test_stage_data.py'],
     'mlm: evaluation reads train.bin, not val.bin'),
    ('train_baseline.py', 'return loss + cfg["aux_weight"] * aux_loss, {', 'return loss, {',
     ['tests/test_stage_data.py'], 'baseline: the MoE balancing loss never joins the loss'),
    ('evaluate.py', 'return [history + [r] for history, r in zip(memory, records)]',
     'return [[r] for history, r in zip(memory, records)]', ['tests/test_evaluation_rows.py'],
     "baseline's memory: the history keeps only the latest turn"),
    ('evaluate.py', 'hits += [float(normalize(a) == normalize(ep["gold"]))',
     'hits += [float(normalize(ep["gold"]) in normalize(a))', ['tests/test_evaluation_rows.py'],
     'recall: an answer that merely contains the gold word counts as a hit'),
    ('evaluate.py', 'return {"ppl": math.exp(loss_sum / max(1, n)),', 'return {"ppl": loss_sum / max(1, n),',
     ['tests/test_evaluation_rows.py'], 'answer perplexity reported as the mean loss (no exp)'),
    ('scores.py', 'torch.log(p).nan_to_num(neginf=-1e30)', 'torch.log(p).nan_to_num(neginf=0.0)',
     ['tests/test_mrl.py::test_bleu_matches_a_plain_python_reference_on_random_sequences', 'tests/test_mrl.py::test_bleu_is_one_for_identical_and_zero_for_disjoint_answers'],
     'bleu: no unigram match taken as log p1 = 0, so a disjoint answer scores above 0'),
    ('scores.py', 'totals.append(valid.sum(dim=1))', 'totals.append(length)',
     ['tests/test_mrl.py::test_bleu_matches_a_plain_python_reference_on_random_sequences', 'tests/test_mrl.py::test_bleu_is_one_for_identical_and_zero_for_disjoint_answers'],
     'bleu: n-gram totals are the token counts, not the number of n-grams'),
    ('engine.py', 'rotations(positions, sa.n_q + sa.n_kv, sa.n_kv, cfg, scale)',
     'rotations(positions, sa.n_q, 2 * sa.n_kv, cfg, scale)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_precision.py::test_generation_under_bf16_autocast_takes_the_fast_path_in_the_weights_dtype'],
     'FastStep: the keys written to the cache are not rotated'),
    ('engine.py', 'lengths = torch.full((ids.size(0),), tokens.size(1), device=ids.device)',
     'lengths = torch.full((ids.size(0),), tokens.size(1) - 1, device=ids.device)',
     ['tests/test_model.py', 'tests/test_formulas_and_options.py', 'tests/test_mrl_fixes.py', 'tests/test_evaluation_rows.py::test_an_answer_ends_at_its_eos_even_when_other_rows_go_on'],
     'generate: a row that never says [EOS] loses its last token'),
    ('chat.py', 'elif query.startswith("/"):', 'elif query == "/":', ['tests/test_chat.py'],
     'chat: an unknown /command is sent to the model as a query'),
    ('chat.py', 'session.reset()', 'session.wait()', ['tests/test_chat.py'],
     'chat: /reset says so but keeps the memory'),
    ('cli.py', 'value is not None and type(value) is not type(old):',
     'value is not None and not isinstance(value, type(old)):', ['tests/test_training_plumbing.py'],
     'configure: isinstance lets a bool pass for an int setting (--max_iters=True)'),
    ('cli.py', '    raise ConfigError(f"device={name!r}: must be auto, cpu, cuda, cuda:N or mps")', '    return',
     ['tests/test_bad_input.py', 'tests/test_training_plumbing.py'],
     'check_device: an unknown device name passes the check'),
    ('data/loaders.py', 'attn_mask[b, :len(row)] = True', 'attn_mask[b, :len(row) - 1] = True',
     ['tests/test_data_loaders.py', 'tests/test_chunks.py'], "pad_rows: each row's last token marked as padding"),
    ('data/loaders.py', 'chosen[:, 0] |= ~chosen.any(dim=1) & attn_mask[:, 0]', 'chosen[:, 0] |= attn_mask[:, 0]',
     ['tests/test_data_loaders.py'], 'mlm_inputs: the first token of every row is always masked'),
    ('data/memory_world.py', 'keys = rng.sample(KEYS, k)', 'keys = [rng.choice(KEYS) for _ in range(k)]',
     ['tests/test_data_world.py', 'tests/test_dmpo.py::test_the_world_records_each_episodes_rivals'],
     'span episodes: one person may get two values for the same (slot, thing)'),
    ('data/tinystories.py', '{"Range": f"bytes={have}-"}', '{"Range": f"bytes={have + 1}-"}',
     ['tests/test_data_tinystories.py'], 'download: a resumed request skips one byte'),
    ('data/tokenizer.py', 'pair_counts[pair] += c * freqs[w]', 'pair_counts[pair] += c',
     ['tests/test_data_tokenizer.py'], 'train_bpe: initial pair counts ignore how often each word occurs'),
    ('convert_rxnn.py', 'a = (a.astype(np.uint32) << 16).view(np.float32)',
     'a = (a.astype(np.uint32) << 8).view(np.float32)', ['tests/test_convert_rxnn.py'],
     'safetensors: bf16 shifted by 8 bits, not 16'),
    ('convert_rxnn.py', 'if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-2):',
     'if theirs.shape != ours.shape and not torch.allclose(theirs, ours, rtol=1e-2):', ['tests/test_convert_rxnn.py'],
     'convert: RoPE buffers of the right shape but wrong base pass the check'),
    ('bench.py', '"theory_score_speedup": H / Hq,', '"theory_score_speedup": H / Hkv,', ['tests/test_bench.py'],
     'attention bench: the theoretical speed-up from the key/value heads, not the query heads'),
]


def description(m):
    return m[4] if len(m) > 4 else f"{m[1].strip()[:30]} -> {m[2].strip()[:30]}"


def problems(m):
    """What is wrong with one entry: an `old` not found exactly once, a mutant that does not parse (a syntax error is
    no realistic bug, and every test would catch it), a no-op, a test target that is not there."""
    file, old, new, tests = m[:4]
    text, out = open(os.path.join(ROOT, file), encoding="utf-8").read(), []
    if text.count(old) != 1:
        out.append(f"{file}: {old!r} occurs {text.count(old)} times, not once")
    else:
        try:
            compile(text.replace(old, new), file, "exec")
        except SyntaxError as e:
            out.append(f"{file}: replacing {old!r} does not parse ({e.msg}, line {e.lineno})")
    if old == new:
        out.append(f"{file}: {old!r} is replaced by itself")
    for target in tests:
        path, _, name = target.partition("::")
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full) or (name and f"def {name}(" not in open(full, encoding="utf-8").read()):
            out.append(f"{file}: test target {target} not found")
    return out


def repo_files():
    """Tracked and untracked-but-not-ignored files: the copy never sees data/cache, out/ or an old run's leftovers."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\0")
    return [f for f in listed if f and os.path.isfile(os.path.join(ROOT, f))]  # a tracked file deleted here is gone


def run_one(m, files, timeout, env):
    """Apply one mutation to a fresh copy and run its tests there. Returns (status, seconds, output tail)."""
    file, old, new, tests = m[:4]
    with tempfile.TemporaryDirectory(prefix="nanorxt-mutant-") as copy:
        for f in files:
            os.makedirs(os.path.dirname(os.path.join(copy, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(copy, f))
        path = os.path.join(copy, file)
        text = open(path, encoding="utf-8").read()
        if text.count(old) != 1:  # --check guards this too, but the file may have changed since
            raise RuntimeError(f"{file}: {old!r} occurs {text.count(old)} times, not once")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
        t0 = time.time()
        # pytest's temporary files (the session's memory world) inside the copy: parallel mutants never share them
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 f"--basetemp={os.path.join(copy, '.pytest-tmp')}", *tests], cwd=copy, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # the whole group: pytest's own children (torchrun, chat.py) too
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return "timeout", time.time() - t0, out[-2000:]
    # 4 (usage error, e.g. a test id that does not exist) and 5 (nothing collected) say nothing about the mutant
    status = "missed" if proc.returncode == 0 else "error" if proc.returncode in (4, 5) else "caught"
    return status, time.time() - t0, out[-2000:]


def main(argv=None):
    p = argparse.ArgumentParser(description="Mutation testing of nanoRxT's test suite.")
    p.add_argument("--only", default="", help="run the mutations whose file or description contains this")
    p.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    p.add_argument("--check", action="store_true", help="only check that every mutation applies (no tests run)")
    p.add_argument("--jobs", type=int, default=1, help="mutations run in parallel")
    p.add_argument("--timeout", type=int, default=300, help="seconds per mutation (a timeout counts as caught)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m[0] or args.only in description(m)]
    if args.list:
        for i, m in enumerate(chosen, 1):
            print(f"{i:3d}  {m[0]:20s} {description(m)}\n     {' '.join(m[3])}")
        return 0
    broken = [m for m in chosen if problems(m)]
    for m in broken:  # before any test runs: a list that no longer fits the code is fixed first
        print("\n".join(f"error: {line}" for line in problems(m)))
    if broken or args.check:
        print(f"{len(chosen) - len(broken)} of {len(chosen)} mutations apply" if broken else
              f"all {len(chosen)} mutations apply: each `old` occurs exactly once and the mutant parses")
        return 1 if broken else 0

    files, results = repo_files(), []
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if args.jobs > 1:  # parallel mutants share the cores: torch's default of one thread per core would oversubscribe
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    print(f"{len(chosen)} mutations, {args.jobs} at a time, timeout {args.timeout}s", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, m, files, args.timeout, env): m for m in chosen}
        for future in as_completed(futures):
            m = futures[future]
            status, seconds, tail = future.result()
            results.append((m, status))
            print(f"{status:8s}{seconds:7.1f}s  {m[0]:20s} {description(m)}", flush=True)
            if status == "error":
                print("    " + "\n    ".join(tail.strip().splitlines()[-5:]), flush=True)
    caught = sum(status in ("caught", "timeout") for _, status in results)
    timeouts = sum(status == "timeout" for _, status in results)
    print(f"\ncaught {caught} of {len(results)} ({100 * caught / max(1, len(results)):.0f}%)"
          + (f", {timeouts} of them by timeout" if timeouts else ""))
    for m, status in sorted(results, key=lambda r: MUTATIONS.index(r[0])):
        if status not in ("caught", "timeout"):
            print(f"  {status}: {m[0]}: {description(m)}  ({' '.join(m[3])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
