"""Hugging Face export (`megamor convert to-hf`) and generation with recursion-wise KV caching.

One 4-rank launch trains every model kind a few steps and saves a sharded checkpoint of each
(TP2 x PP2; KV-sharing kinds at TP2 x DP2, since KV sharing is refused at PP > 1). Then, in this
process: the export loads in transformers and its logits and routing decisions equal those of
megatron's model loaded from the same checkpoint; cached generation equals uncached
recomputation (greedy, sampling, left-padded batches); the cache holds exactly the tokens each
unrolled layer processed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_ranks

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from megamor.checkpoint import CheckpointError  # noqa: E402
from megamor.hf.export import ExportError, export_checkpoint  # noqa: E402
from megamor.inference import load_for_inference  # noqa: E402

pytestmark = pytest.mark.slow  # exports of a 4-rank training of every kind

KINDS = {
    "vanilla": "tp2pp2", "recursive": "tp2pp2", "mor_ec": "tp2pp2", "mor_tc": "tp2pp2",
    "mor_ec_auxrouter": "tp2pp2", "mor_ec_kvshare": "tp2dp2", "mor_tc_free_kvshare": "tp2dp2",
    "recursive_kvshare": "tp2dp2",
}
TEXT = ("The module defines a class that reads the file, splits each line into fields and "
        "returns a list of records; errors are raised when a field is missing. ") * 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, builtin_root):
    root = tmp_path_factory.mktemp("kinds")
    run_ranks(4, "export_kinds.py", [
        "--root", str(root), "--kinds", ",".join(f"{k}:{v}" for k, v in KINDS.items()),
        "train.train_steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
        f"data.builtin_root={builtin_root}"], timeout=900)
    return root


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    paths = {}
    for i, kind in enumerate(KINDS):
        dest = out / kind
        if i == 0:  # the user's command, once
            proc = subprocess.run([sys.executable, "-m", "megamor.cli", "convert", "to-hf",
                                   str(trained / kind / "checkpoints"), str(dest)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            # Not a terminal: no progress bars, no accelerator notice, one line (issue 19)
            assert proc.stderr == "", proc.stderr[-3000:]
            assert proc.stdout == f"exported {trained / kind / 'checkpoints'} -> {dest}\n"
        else:
            export_checkpoint(trained / kind / "checkpoints", dest)
        paths[kind] = dest
    return paths


def _megatron_logits_and_routing(ckpt: Path, ids: torch.Tensor):
    model, cfg, tok = load_for_inference(ckpt)
    vocab = cfg.model.vocab_size or tok.vocab_size
    model.trace_routing, model.routing_trace = True, {}
    with torch.no_grad():
        logits = model(input_ids=ids).transpose(0, 1)[..., :vocab]
    return logits, dict(model.routing_trace), cfg


def _ids(export: Path, n: int = 64, batch: int = 2) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    ids = tok(TEXT)["input_ids"]
    return torch.tensor([ids[i * 7: i * 7 + n] for i in range(batch)])


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_logits_and_routing_equal_megatron(trained, exported, kind):
    export = exported[kind]
    conf = json.loads((export / "config.json").read_text())
    if kind == "vanilla":  # a plain Llama: no remote code
        assert conf["model_type"] == "llama" and "auto_map" not in conf
        hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
        assert type(hf).__name__ == "LlamaForCausalLM"
    else:
        assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.MoRForCausalLM"
        hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert (export / "generation_config.json").is_file()
    ids = _ids(export)
    ref, trace, cfg = _megatron_logits_and_routing(trained / kind / "checkpoints", ids)
    got_trace = {}
    with torch.no_grad():
        if kind == "vanilla":
            got = hf(ids).logits
        else:
            got = hf(ids, routing_trace=got_trace).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 2e-5, (kind, (got - ref).abs().max().item())
    if cfg.model.arch == "mor":
        # Identical causal routing decisions at every step (megatron: [s, b]; HF: [b, s]).
        assert sorted(trace) == sorted(got_trace) == list(range(1, cfg.model.num_recursions + 1))
        for step in trace:
            meg = trace[step].t()
            meg = meg > 0.5 if cfg.routing.type == "expert_choice" else meg >= step - 0.5
            assert torch.equal(meg, got_trace[step]), (kind, step)
        # Routing is not trivial after training: the deepest step keeps some tokens, not all.
        frac = got_trace[cfg.model.num_recursions].float().mean().item()
        assert 0.0 < frac < 1.0, (kind, frac)


@pytest.mark.parametrize("kind", ["mor_ec", "mor_tc", "mor_ec_kvshare", "mor_tc_free_kvshare",
                                  "recursive_kvshare"])
def test_cached_generation_equals_recomputation(exported, kind):
    export = exported[kind]
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    tok.padding_side = "left"
    prompts = ["The module defines", "Errors are raised when a field of the record is missing and"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert not enc.attention_mask.all()  # really padded
    kw = dict(max_new_tokens=12, output_logits=True, return_dict_in_generate=True)
    cached = hf.generate(**enc, do_sample=False, use_cache=True, **kw)
    full = hf.generate(**enc, do_sample=False, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(cached.logits, full.logits))
    assert diff < 1e-4, diff
    # Left-padded batch == each prompt alone.
    for i, p in enumerate(prompts):
        alone = hf.generate(**tok([p], return_tensors="pt"), do_sample=False, max_new_tokens=12)
        assert torch.equal(alone[0], cached.sequences[i, -alone.shape[1]:]), i
    # Sampling: the same seed gives the same tokens with and without the cache.
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(hf.generate(**enc, do_sample=True, top_k=20, temperature=0.9,
                                max_new_tokens=8, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])


def test_cache_holds_exactly_the_tokens_each_layer_processed(exported):
    """Recursion-wise caching: layer l's cache has one entry per token active at l; with KV
    sharing, steps > 1 store nothing and read step 1's entries."""
    for kind in ("mor_ec", "mor_ec_kvshare"):
        hf = AutoModelForCausalLM.from_pretrained(exported[kind], trust_remote_code=True,
                                                  dtype=torch.float32)
        conf = hf.config
        ids = _ids(exported[kind], n=40, batch=2)
        trace = {}
        with torch.no_grad():
            out = hf(ids[:, :30], use_cache=True, routing_trace=trace)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            step_trace = {}
            hf(ids[:, 30:], cache=cache, use_cache=True, routing_trace=step_trace)
        counts = {s: trace[s].sum(1) + step_trace[s].sum(1) for s in trace}  # per sequence
        for i in range(conf.num_hidden_layers):
            step = conf.layer_step[i]
            length = cache.length[i]
            if step == 0:
                assert length.tolist() == [40, 40]
            elif conf.kv_sharing and step > 1:
                assert length is None  # reads step 1's cache
            else:
                assert length.tolist() == counts[step].tolist(), (kind, i)
        vanilla_entries = 2 * 40 * conf.num_hidden_layers
        assert cache.num_entries() < vanilla_entries


def test_export_runs_without_megamor_installed(exported):
    """The shipped modeling code imports only torch and transformers."""
    code = ("import sys; sys.modules['megamor'] = None\n"
            "import torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(exported['mor_tc'])!r}, trust_remote_code=True)\n"
            "print(m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 6])" in proc.stdout


def test_bad_input_fails_clearly(trained, exported, tmp_path):
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_checkpoint(trained / "mor_ec" / "checkpoints", exported["mor_ec"])
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="megamor.json is missing"):
        export_checkpoint(not_ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "convert", "to-hf",
                           str(tmp_path / "missing"), str(tmp_path / "out2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "out2").exists()


def test_bfloat16_export_and_beam_search(trained, exported, tmp_path):
    """A bf16 export keeps bf16 weights and stays close to fp32 (routing decisions near the
    threshold may flip in bf16, so closeness is judged on average and on top-1 agreement); beam
    search (cache reordering) gives the same beams with and without the cache."""
    out = export_checkpoint(trained / "mor_tc" / "checkpoints", tmp_path / "bf16", dtype="bfloat16")
    m16 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert next(m16.parameters()).dtype == torch.bfloat16
    # Routers as in training: fp32 weights and buffers in the file and in the loaded model, fp32
    # scores (the loss-free bias, ~1e-3 steps, does not survive bf16).
    from safetensors.torch import load_file
    saved = load_file(str(next(Path(out).glob("*.safetensors"))))
    routers = {k: v.dtype for k, v in saved.items() if ".routers." in k}
    assert routers and set(routers.values()) == {torch.float32}, routers
    loaded = {n: t.dtype for n, t in [*m16.named_parameters(), *m16.named_buffers()]
              if ".routers." in n}
    assert loaded and set(loaded.values()) == {torch.float32}, loaded
    assert {t.dtype for n, t in m16.named_parameters() if ".routers." not in n} == {torch.bfloat16}
    m32 = AutoModelForCausalLM.from_pretrained(exported["mor_tc"], trust_remote_code=True,
                                               dtype=torch.float32)
    ids = _ids(exported["mor_tc"], n=32, batch=2)
    with torch.no_grad():
        a, b = m32(ids).logits, m16(ids).logits.float()
    assert (a - b).abs().mean().item() < 0.02 * a.abs().mean().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9
    tok = AutoTokenizer.from_pretrained(exported["mor_ec"], trust_remote_code=True)
    m = AutoModelForCausalLM.from_pretrained(exported["mor_ec"], trust_remote_code=True,
                                             dtype=torch.float32)
    enc = tok(["The module defines a class"], return_tensors="pt")
    beams = [m.generate(**enc, num_beams=3, num_return_sequences=3, max_new_tokens=8,
                        do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])


@pytest.mark.parametrize("kind", ["mor_ec", "mor_tc_free_kvshare", "vanilla"])
def test_generation_engine_on_a_checkpoint_equals_the_exports_generate(trained, exported, kind):
    """The generation engine (megamor/generation) loaded from the megamor checkpoint: each
    request's greedy tokens equal the export's single-request generate() (trained routing;
    vanilla: transformers' own LlamaForCausalLM)."""
    from megamor.generation import Engine, Request

    engine = Engine.load(trained / kind / "checkpoints", max_batch=3, block_size=4, prefill_chunk=16)
    remote = kind != "vanilla"
    hf = AutoModelForCausalLM.from_pretrained(exported[kind], trust_remote_code=remote,
                                              dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(exported[kind], trust_remote_code=remote)
    prompts = [TEXT[:n] for n in (12, 90, 40, 160, 5)]
    got = engine.generate([Request(prompt=p, max_new_tokens=10, stop_token_ids=[]) for p in prompts])
    for p, res in zip(prompts, got):
        ids = tok(p)["input_ids"]
        assert res.prompt_ids == ids
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        # The engine stops where the next token would sit past the trained context (the
        # builtin corpus, and so the tokenizer, differ between Python versions: a prompt may
        # come close to it); transformers goes on past max_position_embeddings.
        fits = min(10, engine.context + 1 - len(ids))
        assert (len(res.tokens), res.finish_reason) == (fits, "length" if fits == 10 else "context")
        assert res.tokens == ref[0, len(ids):len(ids) + fits].tolist(), (kind, p)
