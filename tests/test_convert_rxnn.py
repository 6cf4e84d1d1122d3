"""convert_rxnn.py against the reference implementation: tiny random-weight RxT-Alpha components made and run by RxNN
0.2.171 (tests/rxnn_fixture/, built by tests/make_rxnn_fixture.py, whose docstring says how), converted here, must
compute what RxNN computed - the encoder's ED, the updated STM, the decoder's logits (full forward and the fast
single-token path), the MLM head - for both RoPE conventions; each thing the conversion honours, undone, must break
that by a wide margin; bad input is one line and exit 1 with nothing written; and the result runs in chat.py,
evaluate.py, bench.py and as a training stage's init_from."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import convert_rxnn
import engine
import evaluate
import training
from data.tokenizer import Tokenizer
from model import ModelConfig, ReactiveTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "rxnn_fixture")
TOKENIZER = os.path.join(FIXTURE, "rxnn", "decoder", "tokenizer.json")
REF = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
IDS, MASK, STM = REF["ids"], REF["mask"].bool(), REF["stm"]
TOL = 1e-4  # fp32; measured: at most 3.6e-6 in the full forward, 1.7e-5 on the fast path (README)


def settings(kind="rxnn", memattn=None, **flags):
    d = os.path.join(FIXTURE, kind)
    return dict(convert_rxnn.DEFAULTS, encoder=os.path.join(d, "encoder"), decoder=os.path.join(d, "decoder"),
                memory_attention=os.path.join(FIXTURE, memattn or kind, "memory_attention"),
                mlm_head=os.path.join(d, "mlm_head") if kind == "rxnn" else "", tokenizer=TOKENIZER, **flags)


def convert(kind="rxnn", memattn=None, **flags):
    """The converted model (eval mode), in process: nothing written."""
    return convert_rxnn.convert(settings(kind, memattn, **flags))[0].eval()


@pytest.fixture(scope="module")
def models():
    return {kind: convert(kind) for kind in ("rxnn", "rxlm3")}


@torch.no_grad()
def outputs(m):
    """ED (L, B, T, D), the updated STM (L, B, S, D), the logits at the real positions (N, V)."""
    return m.encode(IDS, MASK), m.update_memory(STM, IDS, MASK), m.decode(IDS, STM)[0][MASK]


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("kind", ["rxnn", "rxlm3"])
def test_encoded_data_updated_memory_and_logits_equal_the_reference(models, kind):
    """rxnn: RxNN 0.2.171's own files (legacy experts with biases, no final norm, fp32). rxlm3: the layout and RoPE
    convention of rxlm >= 0.3.40 (stacked experts with a global bias, a LayerNorm before the head, bf16), detected
    from the files. Padded rows: ED everywhere (padding is masked as a key), logits at the real positions."""
    ref = REF[kind]
    ed, stm, logits = outputs(models[kind])
    assert max_diff(ed, ref["ed"]) <= TOL
    assert max_diff(stm, ref["new_stm"]) <= TOL
    assert max_diff(logits, ref["logits"][MASK]) <= TOL
    assert ref["logits"].abs().max() > 3  # not a trivially small comparison


def test_the_mlm_head_equals_the_reference(models):
    with torch.no_grad():
        assert max_diff(models["rxnn"].mlm_head(REF["rxnn"]["ed"][-1]), REF["rxnn"]["mlm"]) <= TOL


@pytest.mark.parametrize("kind", ["rxnn", "rxlm3"])
@pytest.mark.parametrize("rows", [1, 2])
def test_the_fast_single_token_path_equals_the_reference_logits(models, kind, rows):
    """engine.FastStep (expert biases folded into the experts' matrices, the final norm as converted) gives RxNN's
    logits token by token: one row (the experts used in place) and two (gathered) - both rows are unpadded up to 8."""
    m, ref = models[kind], REF[kind]["logits"]
    T, prompt = (12, 4) if rows == 1 else (8, 3)
    ids = IDS[:rows, :T]
    with torch.no_grad():
        memory_kv = m.decoder.project_memory(STM[:, :rows])
        caches = [engine.KVCache(T) for _ in m.decoder.layers]
        m.decoder(m.embed(ids[:, :prompt]), memory_kv, caches=caches)
        step = engine.FastStep(m.decoder, memory_kv, caches, start=prompt, max_new_tokens=T - prompt)
        fast = torch.stack([step(m.embed(ids[:, t]), t) for t in range(prompt, T)], dim=1)
    assert max_diff(fast, ref[:rows, prompt:T]) <= TOL


@pytest.mark.parametrize("variant", ["memattn_simple", "memattn_self"])
def test_other_memory_attention_variants_and_gates_equal_the_reference(variant):
    """simple with one static gate per layer (repeated for every slot), self with elementwise per-slot gates on both
    steps: the write from RxNN's ED gives RxNN's STM."""
    m = convert("rxnn", memattn=variant)
    assert m.cfg.memory_attention == variant.split("_")[1]
    with torch.no_grad():
        stm = m.memory_attention(STM, REF["rxnn"]["ed"], MASK)
    assert max_diff(stm, REF[variant]["new_stm"]) <= TOL


# -----------------------------------------------------------------------------
# Each thing the conversion honours, undone, breaks the parity by far


@pytest.mark.parametrize("kind, wrong", [("rxnn", "rxlm3"), ("rxlm3", "rxnn")])
def test_the_wrong_rope_convention_changes_memory_and_logits_by_far(kind, wrong):
    """Self-attention (the encoder) is the same in both conventions; the memory read and write are not."""
    ed, stm, logits = outputs(convert(kind, rope=wrong))
    assert max_diff(ed, REF[kind]["ed"]) <= TOL
    assert max_diff(stm, REF[kind]["new_stm"]) > 1000 * TOL
    assert max_diff(logits, REF[kind]["logits"][MASK]) > 1000 * TOL


def variant_of(model, **changes):
    """The converted model with ModelConfig options changed: the tensors it keeps, fresh ones where it gains some."""
    torch.manual_seed(0)
    m = ReactiveTransformer(ModelConfig(**{**model.cfg.__dict__, **changes})).eval()
    m.load_state_dict({k: v for k, v in model.state_dict().items() if k in m.state_dict()}, strict=False)
    return m


@pytest.mark.parametrize("kind, changes, changed", [
    ("rxnn", dict(ff_bias=False), "ed"),  # the encoder's SwiGLU biases dropped
    ("rxnn", dict(expert_bias=False), "logits"),  # the experts' biases dropped
    ("rxlm3", dict(moe_out_bias=False), "logits"),  # the global MoE bias dropped
    ("rxnn", dict(final_norm="rms"), "logits"),  # nanoRxT's own final RMSNorm kept
    ("rxlm3", dict(final_norm="none"), "logits"),  # the reference's LayerNorm dropped
])
def test_each_option_undone_breaks_the_parity_by_far(models, kind, changes, changed):
    ed, stm, logits = outputs(variant_of(models[kind], **changes))
    got = {"ed": max_diff(ed, REF[kind]["ed"]), "logits": max_diff(logits, REF[kind]["logits"][MASK])}
    assert got[changed] > 1000 * TOL, got


# -----------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path, tensors, dtypes=None):
    """A minimal safetensors writer, in each tensor's dtype; dtypes={name: "I8"} writes that one as int8 instead."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        blob = (bytes(t.numel()) if (dtypes or {}).get(name) == "I8" else
                t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
        header[name] = {"dtype": (dtypes or {}).get(name, SAFETENSORS_DTYPES[t.dtype]), "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_safetensors_are_read_exactly_in_every_float_dtype(tmp_path):
    """F32, F16, BF16 (the top half of an fp32) and F64, as fp32."""
    x = 10 * torch.randn(3, 5)
    tensors = {str(dtype): x.to(dtype) for dtype in SAFETENSORS_DTYPES}
    write_safetensors(str(tmp_path / "t.safetensors"), tensors)
    read = convert_rxnn.read_safetensors(str(tmp_path / "t.safetensors"), "test")
    assert all(read[k].dtype == torch.float32 and torch.equal(read[k], t.float()) for k, t in tensors.items())


def fixture_copy(tmp_path, kind="rxnn"):
    """{component: its directory} in a copy of the fixture that a test may break."""
    shutil.copytree(os.path.join(FIXTURE, kind), tmp_path / "in")
    return {part: tmp_path / "in" / part for part in ("encoder", "decoder", "memory_attention")}


def edit(component, config=None, add=None, drop=(), dtypes=None):
    """Change a component directory: config values, tensors added or dropped, a tensor's dtype."""
    if config:
        c = json.loads((component / "config.json").read_text())
        (component / "config.json").write_text(json.dumps({**c, **config}))
    if add or drop or dtypes:
        w = convert_rxnn.read_safetensors(str(component / "model.safetensors"), "test")
        w = {k: v for k, v in {**w, **(add or {})}.items() if k not in drop}
        write_safetensors(str(component / "model.safetensors"), w, dtypes)


def flags(dirs):
    return [f"--{part}={path}" for part, path in dirs.items()]


def run_cli(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.run(convert_rxnn.main, argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def self_step_gated_otherwise(dirs):
    dirs["memory_attention"] = dirs["encoder"].parent / "memattn_self"
    shutil.copytree(os.path.join(FIXTURE, "memattn_self", "memory_attention"), dirs["memory_attention"])
    edit(dirs["memory_attention"], config=dict(use_gate_for_self_attention=False))


def drop_config_key(component, key):
    c = json.loads((component / "config.json").read_text())
    c.pop(key)
    (component / "config.json").write_text(json.dumps(c))


def halve_a_shape(component, name):
    """A header whose shape for `name` says half of what its byte range holds (a damaged or forged file)."""
    path = component / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[name]["shape"] = [header[name]["shape"][0] // 2] + header[name]["shape"][1:]
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


S, D = 8, 16
BAD = {  # name: (how to break a copy of the fixture, words the one line must have)
    "missing directory": (lambda d: d.update(encoder=d["encoder"].parent / "nowhere"), ["encoder", "not a directory"]),
    "missing weights file": (lambda d: os.remove(d["decoder"] / "model.safetensors"),
                             ["decoder", "model.safetensors not found"]),
    "a decoder given as the encoder": (lambda d: d.update(encoder=d["decoder"]), ["holds a decoder, not an encoder"]),
    "self-interlayer memory attention": (lambda d: edit(d["memory_attention"], add={
        "model.interlayer_gate_layers.0.gate.weight": torch.zeros(S, S)}), ["memory_attention", "self-interlayer"]),
    "tanh residual gates": (lambda d: edit(d["memory_attention"], config=dict(use_tanh_residual_gate=True)),
                            ["memory_attention", "use_tanh_residual_gate=true", "tanh"]),
    "tanh residual gates by default": (lambda d: drop_config_key(d["memory_attention"], "use_tanh_residual_gate"),
                                       ["memory_attention", "use_tanh_residual_gate=true", "tanh"]),  # RxNN's default
    "a tensor whose bytes contradict its shape": (lambda d: halve_a_shape(d["decoder"], "model.head.bias"),
                                                  ["decoder", "damaged", "model.head.bias"]),
    "slot-status gates": (lambda d: edit(d["memory_attention"], config=dict(residual_gate_slot_status_type="linear")),
                          ["memory_attention", "slot-status"]),
    "another gate on the self step": (self_step_gated_otherwise, ["memory_attention", "different gate"]),
    "shared experts": (lambda d: edit(d["decoder"], add={"model.layers.0.ff.shared_expert.fc2.weight":
                                                         torch.zeros(D, 8)}), ["decoder", "shared experts"]),
    "flash attention": (lambda d: edit(d["decoder"], config=dict(use_flash_attention=True)),
                        ["decoder", "use_flash_attention=true"]),
    "LayerNorm layers": (lambda d: edit(d["encoder"], add={"model.layers.0.norm1.bias": torch.zeros(D)}),
                         ["encoder", "LayerNorm"]),
    "an unknown config key": (lambda d: edit(d["encoder"], config=dict(use_moe_att=True)),
                              ["encoder", "'use_moe_att' is unknown"]),
    "a tensor left over": (lambda d: edit(d["encoder"], add={"model.layers.0.extra.weight": torch.zeros(D)}),
                           ["encoder", "no place in nanoRxT", "model.layers.0.extra.weight"]),
    "a tensor missing": (lambda d: edit(d["decoder"], drop=["model.layers.1.norm3.weight"]),
                         ["decoder", "model.layers.1.norm3.weight is missing"]),
    "an int8 tensor": (lambda d: edit(d["decoder"], dtypes={"model.head.bias": "I8"}),
                       ["decoder", "model.head.bias is I8"]),
    "components that do not belong together": (lambda d: edit(d["memory_attention"], config=dict(att_heads=4)),
                                               ["memory_attention", "att_heads=4", "do not belong together"]),
    "a head size the RoPE buffers contradict": (lambda d: [edit(c, config=dict(att_heads=4)) for c in d.values()],
                                                ["encoder", "rope.inv_freq is not RoPE at head size 4"]),
    "embeddings that differ": (lambda d: edit(d["decoder"], add={"model.embedding.weight":
                                                                 torch.zeros(REF["vocab_size"], D)}),
                               ["decoder", "differs from the encoder's", "--embedding=encoder"]),
    "a file cut short": (lambda d: (d["decoder"] / "model.safetensors").write_bytes(
        (d["decoder"] / "model.safetensors").read_bytes()[:-100]), ["decoder", "damaged"]),
    "not a safetensors file": (lambda d: (d["encoder"] / "model.safetensors").write_bytes(b"not a checkpoint"),
                               ["encoder", "not a safetensors file"]),
    "not JSON": (lambda d: (d["memory_attention"] / "config.json").write_text("{oops"),
                 ["memory_attention", "config.json is not a JSON object"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_exit_1_with_nothing_written(tmp_path, capsys, name):
    make, words = BAD[name]
    dirs = fixture_copy(tmp_path)
    make(dirs)
    out = tmp_path / "out" / "ckpt.pt"
    code, err = run_cli(capsys, [*flags(dirs), f"--out={out}"])
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "out").exists()


def test_embedding_choice_takes_the_chosen_copy(tmp_path):
    dirs = fixture_copy(tmp_path)
    edit(dirs["decoder"], add={"model.embedding.weight": torch.ones(REF["vocab_size"], D)})
    chosen = {c: convert_rxnn.convert(dict(convert_rxnn.DEFAULTS, **{k: str(v) for k, v in dirs.items()}, embedding=c))
              [0].embed.weight for c in ("encoder", "decoder")}
    assert torch.equal(chosen["decoder"], torch.ones(REF["vocab_size"], D))
    assert torch.equal(chosen["encoder"], convert_rxnn.read_safetensors(str(dirs["encoder"] / "model.safetensors"),
                                                                        "encoder")["model.embedding.weight"])


def test_bad_flags_exit_2(tmp_path, capsys):
    args = flags(fixture_copy(tmp_path))
    assert run_cli(capsys, [*args, "--rope=rxlm2"])[0] == 2
    assert run_cli(capsys, args[1:])[0] == 2  # no --encoder
    assert run_cli(capsys, [*args, "--out=ckpt"])[0] == 2
    assert not os.path.exists("ckpt")


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path, capsys):
    j = json.load(open(TOKENIZER))
    j["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tok.json").write_text(json.dumps(j))
    code, err = run_cli(capsys, [*flags(fixture_copy(tmp_path)), f"--tokenizer={tmp_path / 'tok.json'}",
                                 f"--out={tmp_path / 'o.pt'}"])
    assert code == 1 and len(err) == 1 and "Whitespace" in err[0] and not (tmp_path / "o.pt").exists(), err


# -----------------------------------------------------------------------------
# The tokenizer


def test_the_converted_tokenizer_encodes_as_the_reference_with_the_same_ids():
    """Encodings recorded from transformers' PreTrainedTokenizerFast (what RxNN encodes with: no prefix space),
    including bytes the small vocabulary lacks ([UNK] per byte), runs of spaces, newlines, digits."""
    tok = Tokenizer.from_hf_json(TOKENIZER)
    for text, ids in REF["tokenizer"]:
        assert tok.encode(text) == ids, text
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.q_id, tok.a_id] == list(range(7))
    assert tok.vocab_size == REF["vocab_size"] and tok.t_id is None
    text = "Mia has a red ball. What colour is Mia's ball?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "caf\u00e9"]) == [tok.encode(text), tok.encode("caf\u00e9")]
    restored = Tokenizer(**tok.state())  # what a checkpoint keeps: GPT-2's pattern too, which splits digits and spaces
    assert restored.vocab_size == tok.vocab_size and restored.pat_str == tok.pat_str
    for text, ids in REF["tokenizer"]:
        assert restored.encode(text) == ids, text


def test_our_own_tokenizers_keep_the_old_checkpoint_format():
    ranks = {bytes([i]): i for i in range(256)}
    assert Tokenizer(ranks).state() == {"ranks": ranks}


# -----------------------------------------------------------------------------
# The converted checkpoint in the rest of the project


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("converted") / "ckpt.pt"
    convert_rxnn.main([f"--{k}={v}" for k, v in settings("rxnn").items() if v and k != "out"] + [f"--out={path}"])
    return str(path)


def test_the_checkpoint_loads_like_any_other_and_starts_a_training_stage(checkpoint, models):
    model, tok, ckpt = training.load_for_inference(checkpoint)
    assert ckpt["stage"] == "converted" and ckpt["config"]["rope"] == "rxnn"
    assert tok.encode("Mia has a red ball.") == REF["tokenizer"][0][1]
    assert max_diff(outputs(model)[2], outputs(models["rxnn"])[2]) == 0
    cfg = dict(training.TRAIN_DEFAULTS, init_from=checkpoint, seq_len=model.cfg.seq_len)
    assert isinstance(training.init_model(cfg, tok, torch.device("cpu")), ReactiveTransformer)


def test_chat_talks_to_the_converted_model_with_its_tokenizer(checkpoint):
    r = subprocess.run([sys.executable, "chat.py", f"--ckpt={checkpoint}", "--max_new_tokens=8"], cwd=ROOT,
                       input="Mia has a red ball.\nWhat colour is Mia's ball?\n/memory\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("rxt> ") == 2 and "you> What colour is Mia's ball?" in r.stdout
    assert "last update changed it by" in r.stdout and "Traceback" not in r.stderr


def test_evaluate_runs_on_the_converted_model(checkpoint, world, tmp_path):
    results = evaluate.main([f"--ckpt={checkpoint}", f"--data_dir={world}", "--distances=[1]", "--n_per_distance=4",
                             "--chat_flow=False", "--max_turn_answer=16", "--max_answer=8", "--device=cpu",
                             f"--out={tmp_path / 'eval.json'}"])
    assert results["recall"][1]["n"] == 4 and (tmp_path / "eval.json").exists()


def test_bench_runs_a_conversation_with_the_converted_model(checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--quick", "--sections=conversation", f"--ckpt={checkpoint}",
                        f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(out.read_text())["conversation"]["preset"] == checkpoint


def test_stacked_experts_with_biases_convert_with_their_biases(tmp_path):
    """rxlm's stacked layout can also carry per-expert biases, ff.b1 (E, 2H) and ff.b2 (E, D): they are recognised
    (expert_bias) and land in the experts, instead of being refused as leftover tensors."""
    dirs = fixture_copy(tmp_path, "rxlm3")
    w = convert_rxnn.read_safetensors(str(dirs["decoder"] / "model.safetensors"), "test")
    E, D, H2 = w["model.layers.0.ff.w1"].shape
    g = torch.Generator().manual_seed(0)
    b2 = {l: torch.randn(E, D, generator=g).to(torch.bfloat16) for l in range(2)}
    edit(dirs["decoder"], add={**{f"model.layers.{l}.ff.b1": torch.zeros(E, H2, dtype=torch.bfloat16) for l in range(2)},
                               **{f"model.layers.{l}.ff.b2": b2[l] for l in range(2)}})
    m = convert_rxnn.convert(dict(settings("rxlm3"), **{k: str(v) for k, v in dirs.items()}))[0]
    assert m.cfg.expert_bias
    for l in range(2):
        moe = m.decoder.layers[l].moe
        assert torch.equal(moe.b_down.detach(), b2[l].float()) and not moe.b_gate_up.detach().any()
