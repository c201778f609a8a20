"""`megamor eval`: a checkpoint's perplexity against an independent per-token cross-entropy,
few-shot accuracy of Hugging Face models through lm-evaluation-harness against log-probs
recomputed here (offline, with the network blocked), and the errors users meet first."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megamor.cli import main

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
TASK = "megamor_mini_facts"
SEQ = 64
N_SEQ = 20  # sequences evaluated: 3 batches of 8, the last one partial
HAVE_LM_EVAL = all(importlib.util.find_spec(m) for m in ("lm_eval", "accelerate", "transformers"))
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="pip install 'megamor[eval]'")

# Loaded first by every Python process of the few-shot runs: any connection to a non-local
# address (or a DNS lookup) is refused and written to $NET_GUARD_LOG.
NET_GUARD = '''
import os, socket, sys
_LOG = os.environ["NET_GUARD_LOG"]
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1"}
def _record(what):
    with open(_LOG, "a") as f:
        f.write(f"{sys.argv[:3]} {what}\\n")
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _record(f"connect {address!r}")
        raise OSError("network disabled by tests/test_eval.py")
    return _connect(self, address)
socket.socket.connect = connect
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *a, **k):
    if host not in _LOCAL:
        _record(f"getaddrinfo {host!r}")
        raise socket.gaierror("network disabled by tests/test_eval.py")
    return _getaddrinfo(host, *a, **k)
socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture(scope="module")
def mor_ckpt(tmp_path_factory, builtin_root):
    """A tiny expert-choice MoR model after 5 steps on the embedded corpus."""
    out = tmp_path_factory.mktemp("mor")
    cmd = [sys.executable, "-m", "megamor.cli", "pretrain", "model.preset=tiny",
           f"model.seq_length={SEQ}", "model.arch=mor", "routing.type=expert_choice",
           "train.train_steps=5", "train.global_batch_size=8", "train.micro_batch_size=4",
           "train.warmup_steps=1", "tracking.enabled=false", f"data.builtin_root={builtin_root}",
           f"run.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out / "checkpoints"


def _eval(ckpt, out: Path, *extra) -> dict:
    assert main(["eval", str(ckpt), "--data", "builtin", "--max-sequences", str(N_SEQ),
                 "--batch-size", "8", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_perplexity_equals_independent_cross_entropy(mor_ckpt, tmp_path, capsys):
    from megamor.data import ShardedTokenDataset
    from megamor.inference import load_for_inference

    res = _eval(mor_ckpt, tmp_path / "threshold.json")
    printed = capsys.readouterr().out
    assert res["split"] == "val" and "split 'val'" in printed  # the builtin data has one
    assert res["routing"] == "threshold" and res["arch"] == "mor" and res["step"] == 5
    assert res["sequences"] == N_SEQ and res["tokens"] == N_SEQ * SEQ
    assert res["perplexity"] == pytest.approx(math.exp(res["nll"]), rel=1e-12)
    assert f"nll {res['nll']:.4f}" in printed and "mean depth" in printed
    topk = _eval(mor_ckpt, tmp_path / "topk.json", "--routing", "topk")
    assert topk["routing"] == "topk" and topk["tokens"] == res["tokens"]

    # Independently: the same 20 validation sequences in one batch, full logits, torch's
    # cross-entropy; inference mode for threshold routing, training mode for top-k routing.
    model, cfg, _ = load_for_inference(mor_ckpt)
    ds = ShardedTokenDataset(res["data"], "val")
    x = torch.stack([ds[i] for i in range(N_SEQ)])  # [b, s + 1]
    for mode, r in (("eval", res), ("train", topk)):
        getattr(model, mode)()
        model.reset_stats()  # router statistics and the routing trace of one forward
        model.trace_routing = True
        with torch.no_grad():
            logits = model(input_ids=x[:, :-1])  # [s, b, v]
        nll = F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]).double(),
                              x[:, 1:].reshape(-1))
        assert r["nll"] == pytest.approx(nll.item(), abs=1e-5), mode
        frac = [model.routing_trace[s].double().mean().item() for s in sorted(model.routing_trace)]
        assert r["fraction_per_step"] == pytest.approx(frac, abs=1e-9), mode
        assert r["mean_depth"] == pytest.approx(sum(frac)), mode
    # Top-k keeps exactly the training capacities (1, 2/3, 1/3 of the 64 positions).
    assert topk["fraction_per_step"] == pytest.approx([1.0, 42 / SEQ, 21 / SEQ])
    assert res["nll"] != topk["nll"]


# ----------------------------------------------------------------------------- few-shot


def _docs(n: int) -> list[dict]:
    lines = (TASKS / f"{TASK}.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines[:n]]


def _recompute(tokenizer, logprobs, docs) -> list[list[float]]:
    """Per choice: sum of log p(continuation token | prefix), with lm-evaluation-harness's split of
    context and continuation (encode the whole string, the continuation is what follows the
    context's tokens)."""
    out = []
    for doc in docs:
        ctx = f"Question: {doc['question']}\nAnswer:"
        ctx_ids = tokenizer.encode(ctx, add_special_tokens=False)
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(ctx + " " + choice, add_special_tokens=False)
            cont = whole[len(ctx_ids):]
            lp = logprobs(whole[:-1])  # [len - 1, vocab]
            lls.append(sum(lp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont)))
        out.append(lls)
    return out


def _run_lm_eval(model_dir: Path, tmp_path: Path, limit: int = 10) -> dict:
    """`megamor eval --hf` in a fresh process from another working directory, with no offline
    variables set by us and the network blocked."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NET_GUARD)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), NET_GUARD_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(guard), str(ROOT), env.get("PYTHONPATH", "")]))
    out = tmp_path / "fewshot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megamor.cli", "eval", "--hf", str(model_dir), "--tasks", TASK,
         "--include-path", os.path.relpath(TASKS, tmp_path), "--limit", str(limit),
         "--batch-size", "4", "--log-samples", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not log.exists(), f"network access attempted:\n{log.read_text()}"
    assert TASK in proc.stdout and "acc" in proc.stdout  # the printed table
    return json.loads(out.read_text())


def _check_against(res: dict, recomputed: list[list[float]], docs: list[dict], atol: float) -> None:
    acc = res["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert res["n-samples"][TASK]["effective"] == len(docs)
    samples = {s["doc_id"]: s for s in res["samples"][TASK]}
    assert sorted(samples) == list(range(len(docs)))
    correct = []
    for i, doc in enumerate(docs):
        s = samples[i]
        assert s["target"] == doc["answer"]
        assert s["loglikelihoods"] == pytest.approx(recomputed[i], abs=atol), i
        right = max(range(len(doc["choices"])), key=lambda c: recomputed[i][c]) == doc["answer"]
        assert s["acc"] == float(right), i
        correct.append(right)
    assert acc == pytest.approx(sum(correct) / len(correct))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer LlamaForCausalLM and a byte-level BPE trained on a few KB, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("llama")
    text = [f"{d['question']} {' '.join(d['choices'])}" for d in _docs(30)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0))
    model.save_pretrained(path)
    return path


@needs_lm_eval
@pytest.mark.slow
def test_lm_eval_on_a_hugging_face_model(tiny_llama, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    res = _run_lm_eval(tiny_llama, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()

    def logprobs(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    docs = _docs(10)
    _check_against(res, _recompute(tok, logprobs, docs), docs, atol=1e-4)


@needs_lm_eval
@pytest.mark.slow
def test_lm_eval_on_an_exported_mor_checkpoint(mor_ckpt, tmp_path):
    """The MoR export (remote code) through lm_eval; its log-probs are the megatron checkpoint's own
    under threshold routing."""
    if not (ROOT / "megamor" / "hf" / "export.py").exists():
        pytest.skip("megamor/hf/export.py (megamor convert to-hf) is not there yet")
    from transformers import AutoTokenizer

    from megamor.hf.export import export_checkpoint
    from megamor.inference import load_for_inference

    export = export_checkpoint(mor_ckpt, tmp_path / "export")
    res = _run_lm_eval(export, tmp_path)
    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    model, cfg, mtok = load_for_inference(mor_ckpt)
    vocab = cfg.model.vocab_size or mtok.vocab_size

    def logprobs(ids):
        model.reset_stats()  # statistics accumulate until read; sequences differ in length here
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]))[:, 0, :vocab].float().log_softmax(-1)

    docs = _docs(10)
    _check_against(res, _recompute(tok, logprobs, docs), docs, atol=1e-4)


# ----------------------------------------------------------------------------- errors


def _fails(argv, *needles) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.slow
def test_errors_are_clear(mor_ckpt, tmp_path, monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")  # what the command would set, undone after the test
    _fails(["eval", str(tmp_path / "nowhere")], "checkpoint error", "does not exist")
    _fails(["eval"], "needs a checkpoint", "--hf")
    _fails(["eval", str(mor_ckpt), "--tasks", TASK], "convert to-hf")
    _fails(["eval", str(mor_ckpt), "--data", str(tmp_path / "no_data")], "data error",
           str(tmp_path / "no_data"))
    _fails(["eval", "--hf", str(tmp_path / "no_export"), "--tasks", TASK],
           str(tmp_path / "no_export"), "no config.json")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")  # tasks are checked before the model is read
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "lm_eval", None)  # as if not installed
        _fails(["eval", "--hf", str(export), "--tasks", TASK], "pip install 'megamor[eval]'")
    if HAVE_LM_EVAL:
        _fails(["eval", "--hf", str(export), "--tasks", f"{TASK},no_such_task", "--include-path",
                str(TASKS)], "unknown task(s) no_such_task", f"under {TASKS}: {TASK}")
        _fails(["eval", "--hf", str(export), "--tasks", TASK, "--include-path",
                str(tmp_path / "no_tasks")], "--include-path", "no such directory")
