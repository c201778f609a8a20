"""`megamor convert from-hf`: tiny random Llamas (transformers) imported as vanilla and as
recursive / MoR models, up-training from the import (`checkpoint.init_from`, gloo ranks), the
errors, and the lossless from-hf -> to-hf round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from megamor.checkpoint import read_tensors  # noqa: E402
from megamor.hf.importer import ImportError_, import_hf  # noqa: E402
from megamor.hf.weights import layer_from_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
             max_position_embeddings=256, tie_word_embeddings=True)
SEQ, VOCAB = 64, 1024  # the builtin dataset's tokenizer
# Checkpoint names of one layer's tensors (megatron's TE-style keys) -> names in layer_from_hf.
CKPT_NAMES = {
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
}


@pytest.fixture(scope="module")
def tok(builtin_root):
    from megamor.data import builtin_dataset_root, ensure_builtin_dataset
    from megamor.tokenizer import load_tokenizer

    root = builtin_dataset_root(builtin_root, SEQ, VOCAB)
    ensure_builtin_dataset(root, SEQ, VOCAB)
    return load_tokenizer(root / "tokenizer")


def make_llama(path: Path, tok, layers: int, vocab: int, seed: int, **extra):
    """A random LlamaForCausalLM saved like a Hub checkpoint (safetensors + tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, **{**SHAPE, **extra})
    model = LlamaForCausalLM(conf).eval()
    with torch.no_grad():  # distinct norm weights, so that a wrong layer cannot pass by chance
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    tok.hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": tok.eos_token}))
    return model


@pytest.fixture(scope="module")
def llama6(tmp_path_factory, tok):
    """6 layers, vocab 1030 > the tokenizer's 1024 (some Hub models pad it); megamor: 1088 rows."""
    path = tmp_path_factory.mktemp("llama6")
    return path, make_llama(path, tok, 6, 1030, seed=6)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("llama8")
    return path, make_llama(path, tok, 8, VOCAB, seed=8, initializer_range=0.08)


def hf_layer(hf_dir: Path, i: int) -> dict:
    sd = load_file(str(hf_dir / "model.safetensors"))
    return layer_from_hf(sd, f"model.layers.{i}.", 4, 2, 16)


def unique_layer(ckpt: dict, u: int) -> dict:
    return {ours: ckpt[f"layers.{u}.{key}"] for key, ours in CKPT_NAMES.items()}


def expected_layer(hf_dir: Path, layers: list[int]) -> dict:
    parts = [hf_layer(hf_dir, i) for i in layers]
    return {k: torch.stack([p[k].double() for p in parts]).mean(0).float() for k in parts[0]}


# ----------------------------------------------------------------------------- vanilla


def test_vanilla_import_gives_the_same_logits(tmp_path, llama6, tok):
    from megamor.inference import load_for_inference

    hf_dir, hf_model = llama6
    out = import_hf(hf_dir, tmp_path / "ck")
    meta = json.loads((out / "megamor.json").read_text())
    assert meta["kind"] == "weights" and meta["step"] == 0
    assert meta["model"]["vocab_size"] == 1030 and meta["model"]["padded_vocab_size"] == 1088
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    model, cfg, _ = load_for_inference(out)
    m = cfg.model
    assert (m.arch, m.num_layers, m.vocab_size, m.seq_length, m.kv_channels) == \
        ("vanilla", 6, 1030, 256, None)
    assert (m.rotary_base, m.norm_eps, m.init_std) == (10000.0, 1e-6, 0.02)
    texts = ["def twice(x):\n    return x * 2  # the argument, twice over, as a number",
             "The quick brown fox jumps over the lazy dog, then runs back home again."]
    ids = torch.tensor([tok.encode(t)[:16] for t in texts])
    with torch.no_grad():
        ours = model(input_ids=ids).transpose(0, 1)  # [b, s, padded vocab]
        ref = hf_model(ids).logits
    assert ours.shape[-1] == 1088
    torch.testing.assert_close(ours[..., :1030], ref, atol=1e-5, rtol=0)
    assert torch.all(ours[..., 1030:] == 0)  # zero padding rows: logit 0, never a target
    emb = model.embedding.word_embeddings.weight
    assert torch.equal(emb[:1030], hf_model.model.embed_tokens.weight)


# ----------------------------------------------------------------------------- shared block


# 8 original layers -> middle_cycle, N_r = 3, L = 8: prelude 0, block of B = 2 looped 3 times,
# coda 7; inner originals 1..6 run at unrolled positions 0..5 (identity mapping).
MIDDLE_CYCLE = ["model.arch=mor", "model.num_recursions=3", "model.sharing=middle_cycle"]
EXPECTED_MC = {  # unique layer 1 / 2 (block) -> original layers (a mean for average)
    "average": ([1, 3, 5], [2, 4, 6]),  # block slot b runs at positions b, b + 2, b + 4
    "stepwise": ([1], [4]),  # every N_r-th inner layer: inner 0 and 3
    "lower": ([1], [2]),
    "upper": ([5], [6]),
}
# 8 original layers -> middle_sequence, N_r = 3, L = 11 (deeper: 9 recursive positions over 6
# inner originals, position m -> inner floor(m * 6 / 9) = 0 0 1 2 2 3 4 4 5); unique 1, 2, 3.
DEEPER = ["model.arch=recursive", "model.num_recursions=3", "model.sharing=middle_sequence",
          "model.num_layers=11"]
EXPECTED_DEEP = {"average": ([1, 2], [3, 4], [5, 6]), "stepwise": ([1], [3], [5])}


def test_shared_block_initialisations(tmp_path, llama8):
    hf_dir, hf_model = llama8
    cases = [(MIDDLE_CYCLE, init, exp) for init, exp in EXPECTED_MC.items()] + \
            [(DEEPER, init, exp) for init, exp in EXPECTED_DEEP.items()]
    for overrides, init, expected in cases:
        out = import_hf(hf_dir, tmp_path / f"{overrides[0]}-{init}", overrides, init=init)
        ck = read_tensors(out)
        num_unique = len(expected) + 2
        layers = {int(k.split(".")[1]) for k in ck if k.startswith("layers.")}
        assert layers == set(range(num_unique))
        assert torch.equal(ck["final_norm.weight"], hf_model.model.norm.weight)
        for u, orig in [(0, [0]), (num_unique - 1, [7])] + list(enumerate(expected, start=1)):
            want, got = expected_layer(hf_dir, orig), unique_layer(ck, u)
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0,
                                           msg=f"{init} {overrides[0]}: layer {u} {k}")
        meta = json.loads((out / "megamor.json").read_text())
        assert meta["init"] == init and meta["layer_sources"]["1"] == expected[0]
        assert any(k.startswith("routers.") for k in ck) == ("model.arch=mor" in overrides)

    out = import_hf(hf_dir, tmp_path / "random", MIDDLE_CYCLE, init="random")
    ck = read_tensors(out)
    for u, orig in [(0, 0), (3, 7)]:  # prelude and coda are still imported
        got = unique_layer(ck, u)
        for k, t in hf_layer(hf_dir, orig).items():
            assert torch.equal(got[k], t), (u, k)
    for u in (1, 2):  # the block keeps megamor's seeded init: no original layer, ones for norms
        got = unique_layer(ck, u)
        for i in range(8):
            fc1 = hf_layer(hf_dir, i)["mlp.linear_fc1.weight"]
            assert not torch.equal(got["mlp.linear_fc1.weight"], fc1)
        assert torch.all(got["input_layernorm.weight"] == 1)
    assert not torch.equal(unique_layer(ck, 1)["self_attention.linear_qkv.weight"],
                           unique_layer(ck, 2)["self_attention.linear_qkv.weight"])


# ----------------------------------------------------------------------------- up-training


SIZE = [f"model.seq_length={SEQ}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.warmup_steps=1", "train.log_interval=1", "tracking.enabled=false"]


def pretrain(ck: Path, out: Path, data: Path, nproc: int, extra: list, expect: int = 0):
    cmd = [sys.executable, "-m", "megamor.cli", "pretrain", "--nproc", str(nproc),
           "--config", str(ck / "config.yaml"), f"data.path={data}", f"run.output_dir={out}",
           *SIZE, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def readme_init_from_example() -> list[list[str]]:
    """The README's up-training example: from-hf, data prepare with the imported tokenizer,
    pretrain with init_from (issue 19: it failed as written, on data.path)."""
    import shlex
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("megamor convert from-hf "))
    return [shlex.split(l.split("  #")[0]) for l in lines[start:start + 3]]


def run_readme_example(hf_dir: Path, tmp: Path, model_overrides: list, capsys):
    """The README's three commands with this test's model, data, paths and sizes; the first two
    in this process. Returns (checkpoint, prepared data, the pretrain command's arguments)."""
    from megamor.cli import main

    imp, prep, train = readme_init_from_example()
    assert imp[:3] == ["megamor", "convert", "from-hf"] and len(imp) >= 5
    ck, data = tmp / "ckpt" / "smol-mor", tmp / "prepared-smol"
    assert main(["convert", "from-hf", str(hf_dir), str(ck), *model_overrides]) == 0
    assert prep[:3] == ["megamor", "data", "prepare"] and "--tokenizer" in prep
    assert prep[prep.index("--tokenizer") + 1] == f"{imp[4]}/tokenizer"
    assert main(["data", "prepare", "builtin", "--out", str(data), "--seq-length", str(SEQ),
                 "--tokenizer", str(ck / "tokenizer"), "--workers", "0", "--no-progress",
                 "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert train[:2] == ["megamor", "pretrain"]
    args = [a.replace(imp[4], str(ck)).replace(prep[prep.index("--out") + 1], str(data))
            for a in train[2:]]
    return ck, data, args


def first_batch_loss(model, cfg) -> float:
    """The loss the trainer reports for step 1 (global batch 0) under training-mode routing."""
    from megamor.data import GlobalBatchSampler, get_batch
    from megamor.training.data import open_dataset

    _, data = open_dataset(cfg)
    t = cfg.train
    sampler = GlobalBatchSampler(len(data), t.global_batch_size, t.micro_batch_size, 1, 0,
                                 cfg.data.seed)
    model.train()
    with torch.no_grad():
        losses = [model(**{"input_ids": b["tokens"], "labels": b["labels"]}).mean()
                  for b in (get_batch(data, idx) for idx in sampler.rank_micro_batches(0))]
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_up_training_from_an_imported_mor_model(tmp_path, builtin_root, llama8, capsys):
    """The README's example as written (with this test's model, data and sizes): import,
    tokenize data with the imported tokenizer, train from the weights at TP 2."""
    from megamor.config import load_config
    from megamor.inference import build_single_process_model, load_for_inference

    hf_dir, _ = llama8
    ck, data, args = run_readme_example(hf_dir, tmp_path, MIDDLE_CYCLE + ["routing.type=expert_choice"],
                                        capsys)
    assert args[:2] == ["--nproc", "2"] and f"checkpoint.init_from={ck}" in args
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megamor.cli", "pretrain", *args, f"run.output_dir={run}", *SIZE,
           "parallel.tensor_model_parallel_size=2", "train.train_steps=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"initialised the model weights from {ck}" in proc.stdout
    assert "resumed from" not in proc.stdout
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m] == [1, 2]  # a fresh start at step 0

    # Step 1's loss is the imported model's loss on global batch 0, not a fresh model's.
    over = [f"model.seq_length={SEQ}", f"data.path={data}",
            "train.global_batch_size=8", "train.micro_batch_size=4"]
    cfg = load_config(ck / "config.yaml", over)
    model, _, _ = load_for_inference(ck)
    imported = first_batch_loss(model, cfg)
    fresh = first_batch_loss(build_single_process_model(cfg, VOCAB)[0], cfg)
    assert m[0]["loss"] == pytest.approx(imported, rel=1e-4)
    assert abs(fresh - imported) > 0.05, (fresh, imported)

    # A requeued job (here on one rank) resumes from its own checkpoint, not from init_from.
    proc = pretrain(ck, run, data, 1, [f"checkpoint.init_from={ck}", "train.train_steps=3",
                                       "checkpoint.resume=auto"])
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in proc.stdout
    assert "init_from" in proc.stdout and "not used" in proc.stdout
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    # --resume cannot take a weights-only checkpoint (refused before any rank starts); the
    # message names the alternative.
    proc = pretrain(ck, tmp_path / "bad", data, 1, ["--resume", str(ck)], expect=2)
    assert "weights-only checkpoint" in proc.stderr and f"checkpoint.init_from={ck}" in proc.stderr


# ----------------------------------------------------------------------------- errors


def _edit_config(path: Path, **changes):
    conf = json.loads((path / "config.json").read_text())
    conf.update(changes)
    (path / "config.json").write_text(json.dumps(conf))


def _drop_tensor(path: Path, name: str):
    sd = load_file(str(path / "model.safetensors"))
    del sd[name]
    save_file(sd, str(path / "model.safetensors"))


ERRORS = {
    "gpt2": (lambda p: _edit_config(p, model_type="gpt2"), [],
             ["config.json", "model_type 'gpt2'", "llama"]),
    "untied": (lambda p: _edit_config(p, tie_word_embeddings=False), [],
               ["config.json", "tie_word_embeddings=false"]),
    "bias": (lambda p: _edit_config(p, attention_bias=True), [], ["attention_bias=true"]),
    "rope_scaling": (lambda p: _edit_config(p, rope_parameters={"rope_type": "llama3",
                                                                "rope_theta": 5e5}),
                     [], ["rope_parameters.rope_type='llama3'"]),
    "act": (lambda p: _edit_config(p, hidden_act="gelu"), [], ["hidden_act='gelu'"]),
    "missing": (lambda p: _drop_tensor(p, "model.layers.3.mlp.up_proj.weight"), [],
                ["model.layers.3.mlp.up_proj.weight", "missing", "(176, 64)"]),
    "hidden": (lambda p: None, ["model.hidden_size=128"],
               ["model.hidden_size=128", "hidden_size=64", "config.json"]),
    "no_tokenizer": (lambda p: (p / "tokenizer.json").unlink(), [], ["tokenizer"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_import_errors_name_the_problem(tmp_path, llama6, case):
    import shutil

    breaks, overrides, words = ERRORS[case]
    src = tmp_path / "hf"
    shutil.copytree(llama6[0], src)
    breaks(src)
    out = tmp_path / "out" / "ck"
    with pytest.raises(ImportError_) as e:
        import_hf(src, out, overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists() and not (tmp_path / "out").exists()  # nothing written


def test_cli_refuses_to_overwrite(tmp_path, llama6):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "convert", "from-hf",
                           str(llama6[0]), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert "megamor: convert from-hf:" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "keep").read_text() == "x"


# ----------------------------------------------------------------------------- round trip


def test_vanilla_round_trip_is_lossless(tmp_path, llama6):
    export = pytest.importorskip("megamor.hf.export")
    hf_dir, _ = llama6
    back = export.export_checkpoint(import_hf(hf_dir, tmp_path / "ck"), tmp_path / "hf")
    a = load_file(str(hf_dir / "model.safetensors"))
    b = load_file(str(back / "model.safetensors"))
    b.pop("lm_head.weight", None)  # tied: the same tensor as the embedding
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # Issue 19 item 6: the exported tokenizer.json gains a post-processor (transformers'), which
    # changes no token id: the fingerprint stays, so the re-import's data still matches.
    from megamor.tokenizer import load_tokenizer
    assert json.loads((back / "tokenizer.json").read_text())["post_processor"] is not None
    assert load_tokenizer(back).fingerprint == load_tokenizer(hf_dir).fingerprint
    again = json.loads((import_hf(back, tmp_path / "again") / "megamor.json").read_text())
    assert again["tokenizer_fingerprint"] == load_tokenizer(hf_dir).fingerprint
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    for field in ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "num_hidden_layers", "vocab_size",
                  "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "hidden_act",
                  "attention_bias", "mlp_bias", "max_position_embeddings", "initializer_range"):
        assert ca.get(field) == cb.get(field), (field, ca.get(field), cb.get(field))


def test_mor_round_trip_gives_the_same_model(tmp_path, llama8):
    """Issue 19 item 6: `from-hf` refused megamor's own MoR exports (model_type megamor_mor).
    MoR -> HF -> MoR: the same config, tensors (routers included) and logits."""
    from megamor.hf.export import export_checkpoint
    from megamor.inference import load_for_inference

    hf_dir, _ = llama8
    ck = import_hf(hf_dir, tmp_path / "mor", MIDDLE_CYCLE + ["routing.type=token_choice",
                                                             "routing.capacity=[1.0,0.5,0.25]"])
    back = import_hf(export_checkpoint(ck, tmp_path / "hf"), tmp_path / "back")
    a, b = read_tensors(ck), read_tensors(back)
    assert a.keys() == b.keys() and any(k.startswith("routers.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    (ma, ca, ta), (mb, cb, tb) = load_for_inference(ck), load_for_inference(back)
    assert (cb.model.arch, cb.model.num_recursions, cb.model.sharing, cb.routing.type) == \
        (ca.model.arch, ca.model.num_recursions, ca.model.sharing, ca.routing.type)
    assert cb.routing.capacities(3) == [1.0, 0.5, 0.25] and tb.fingerprint == ta.fingerprint
    ids = torch.tensor([ta.encode("def twice(x):\n    return x * 2  # twice over")[:16]])
    with torch.no_grad():
        assert torch.equal(ma(input_ids=ids), mb(input_ids=ids))
    assert cb.data.path is None  # the data to train on is the user's choice
    with pytest.raises(ImportError_, match="routing.type=expert_choice cannot differ from the "
                                           "exported megamor model"):
        import_hf(tmp_path / "hf", tmp_path / "x", ["routing.type=expert_choice"])


def test_imported_config_needs_data_and_a_matching_tokenizer_before_ranks_start(tmp_path, llama6,
                                                                                capsys):
    """Issue 19 item 6: an imported config carried data.path=builtin (the README's example
    failed as written), and init_from with another tokenizer failed inside the ranks (exit 1
    after 9 s) although the docs promise the check before they start (exit 2)."""
    from megamor.cli import main
    from megamor.data import prepare_dataset
    from megamor.tokenizer import train_bpe

    ck = import_hf(llama6[0], tmp_path / "ck")

    def pretrain_line(*extra) -> str:
        try:
            rc = main(["pretrain", "--nproc", "2", "--config", str(ck / "config.yaml"),
                       f"checkpoint.init_from={ck}", f"run.output_dir={tmp_path / 'run'}", *SIZE,
                       *extra])
        except SystemExit as e:
            rc = e.code
        text = capsys.readouterr()
        assert rc == 2 and text.out == "" and text.err.count("\n") == 1, (rc, text)
        return text.err

    assert pretrain_line().startswith("megamor: config error: data.path is not set")
    other = train_bpe(["some other words to tokenize, quite unlike the model's"] * 30, 300,
                      tmp_path / "other_tok")
    docs = tmp_path / "docs.txt"
    docs.write_text("a few lines of text\n" * 400)
    prepare_dataset([str(docs)], other, SEQ, tmp_path / "other_data", workers=0, progress=False,
                    val_fraction=0.0)
    line = pretrain_line(f"data.path={tmp_path / 'other_data'}")
    assert line.startswith(f"megamor: checkpoint error: checkpoint.init_from={ck}: ")
    assert other.fingerprint in line and f"--tokenizer {ck / 'tokenizer'}" in line
