"""`megamor eval`: validation perplexity of a checkpoint, few-shot accuracy of a Hugging Face export.

    megamor eval CKPT [--data PATH|builtin] [--split S] [--routing threshold|topk]
                 [--max-sequences N] [--max-batches N] [--batch-size B] [--out results.json]
    megamor eval --hf EXPORT_DIR --tasks T1,T2 [--include-path DIR] [--num-fewshot K]
                 [--limit N] [--batch-size B] [--out results.json]

Perplexity runs the checkpoint (any saved layout) as one single-process megatron model and
averages the same per-token loss the trainer minimises over the first N sequences of a prepared
split. Routing: `threshold` is causal inference routing (a token continues while
sigmoid(logit) >= 0.5), `topk` the training-time expert-choice capacity routing, which looks at
the whole sequence; comparing the two tells how much inference routing costs.

Few-shot accuracy goes through lm-evaluation-harness on tasks whose data is on local disk,
with the Hugging Face libraries forced offline.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class EvalError(Exception):
    """A bad input to `megamor eval` (data, export directory, task name), worded for the user."""


# ----------------------------------------------------------------------------- perplexity


def resolve_eval_data(spec: Optional[str], cfg) -> str:
    """The data spec to read: `spec` (a prepared directory, a blend, or 'builtin'), by default the
    checkpoint's own training data; 'builtin' is (re)built for the checkpoint's settings."""
    spec = spec or cfg.data.path
    if spec is None:
        raise EvalError("the checkpoint's config names no training data (data.path is unset, as "
                        "after `megamor convert from-hf`): pass --data DIR")
    if spec != "builtin":
        return spec
    from megamor.data import builtin_dataset_root, ensure_builtin_dataset
    base = Path(os.path.expanduser(cfg.data.builtin_root))
    root = builtin_dataset_root(base, cfg.model.seq_length, cfg.data.tokenizer_vocab_size)
    return str(ensure_builtin_dataset(root, cfg.model.seq_length, cfg.data.tokenizer_vocab_size))


def open_eval_split(spec: str, split: Optional[str], model_seq_length: int, fingerprint):
    """-> (dataset, split name, note). Default split: 'val' when the data has a non-empty one."""
    from megamor.data import load_manifest, open_training_data, parse_data_spec

    manifest = load_manifest(parse_data_spec(spec)[0].path)
    note = ""
    if split is None:
        val = manifest.splits.get("val")
        split = "val" if val is not None and val.num_samples > 0 else "train"
        if split == "train":
            note = "no validation split in the data: evaluating the train split"
    if manifest.seq_length > model_seq_length:
        raise EvalError(f"{manifest.path}: sequences of {manifest.seq_length} tokens, longer than the "
                        f"model's {model_seq_length} (prepare data with --seq-length <= "
                        f"{model_seq_length})")
    ds = open_training_data(spec, manifest.seq_length, fingerprint, split=split)
    return ds, split, note


@contextlib.contextmanager
def routing_mode(model, routing: str):
    """`topk`: the model routes as in training (expert-choice capacity top-k). The MoR model picks
    its routing from its own `training` flag, so only that flag is flipped: every submodule stays in
    eval mode, and under no_grad no auxiliary loss is attached."""
    old = model.training
    model.training = routing == "topk"
    try:
        yield
    finally:
        model.training = old


def perplexity(model, dataset, batch_size: int = 8, max_sequences: Optional[int] = None,
               max_batches: Optional[int] = None, device=None, progress: bool = False,
               routing: str = "threshold") -> dict:
    """Mean next-token NLL over the first sequences of `dataset` (in order), with recursion-depth
    statistics of the routing used. Sequences are whole samples: tokens = sample[:-1], labels =
    sample[1:], exactly as in training."""
    import torch
    from tqdm import tqdm

    from megamor.data import get_batch

    n = len(dataset) if max_sequences is None else min(max_sequences, len(dataset))
    starts = list(range(0, n, batch_size))
    if max_batches is not None:
        starts = starts[:max_batches]
    # Where each recursion step starts in the unrolled network: its token count is the step's.
    first_layer = {}
    for l in model.plan.layers:
        if l.step > 0:
            first_layer.setdefault(l.step, l.index)
    steps = sorted(first_layer)
    nll_sum, n_tokens, n_seq = 0.0, 0, 0
    step_tokens = {r: 0.0 for r in steps}
    agree = {r: [0.0, 0.0] for r in steps}  # expert-choice: threshold == top-k, over reached
    device = device or torch.device("cpu")
    with torch.no_grad(), routing_mode(model, routing):
        for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
            batch = get_batch(dataset, range(s, min(s + batch_size, n)))
            model.reset_stats()
            loss = model(input_ids=batch["tokens"].to(device), labels=batch["labels"].to(device))  # [b, s]
            nll_sum += loss.double().sum().item()  # host sync, once per batch
            n_tokens += loss.numel()
            n_seq += loss.shape[0]
            for r in steps:
                step_tokens[r] += model.token_counts.get(first_layer[r], 0.0)
                acc, reached = (model.stats.get(f"router/step{r}/{k}") for k in ("sampling_acc", "reached"))
                if acc is not None:
                    agree[r][0] += float(acc) * float(reached)
                    agree[r][1] += float(reached)
    if n_tokens == 0:
        raise EvalError("no sequences to evaluate (--max-sequences / --max-batches is 0)")
    nll = nll_sum / n_tokens
    out: dict[str, Any] = {"nll": nll, "perplexity": math.exp(nll), "tokens": n_tokens,
                           "sequences": n_seq, "routing": routing}
    if steps:
        frac = [step_tokens[r] / n_tokens for r in steps]
        out["fraction_per_step"] = frac
        out["mean_depth"] = sum(frac)  # a token's depth = number of steps it went through
        if any(agree[r][1] for r in steps):
            out["threshold_topk_agreement"] = [agree[r][0] / max(agree[r][1], 1.0) for r in steps]
    return out


def cmd_eval_checkpoint(args) -> int:
    import torch

    from megamor.checkpoint import CheckpointError, read_meta, resolve_resume
    from megamor.data import DataError
    from megamor.inference import load_for_inference

    try:
        ckpt = resolve_resume(args.checkpoint, Path(args.checkpoint))
        model, cfg, tok = load_for_inference(ckpt)
    except CheckpointError as e:
        sys.exit(f"megamor: checkpoint error: {e}")
    try:
        spec = resolve_eval_data(args.data, cfg)
        dataset, split, note = open_eval_split(spec, args.split, cfg.model.seq_length, tok.fingerprints)
    except (DataError, EvalError) as e:
        sys.exit(f"megamor: eval: data error: {e}")
    device = torch.device(_device(args.device))
    model.to(device)
    step = read_meta(ckpt).get("step")
    m = cfg.model
    arch = m.arch + (f" {cfg.routing.type}" if m.arch == "mor" else "") + \
        (f", {m.num_recursions} recursions" if m.arch != "vanilla" else "")
    routing = args.routing if m.arch == "mor" and cfg.routing.type == "expert_choice" else "threshold"
    if routing != args.routing:
        note = (note + "; " if note else "") + "routing topk only differs for expert-choice MoR"
    print(f"checkpoint {ckpt} (step {step}, {arch}) on {device}")
    print(f"data {spec}, split {split!r} ({len(dataset):,} sequences of {dataset.seq_length} tokens)"
          + (f" [{note}]" if note else ""))
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        res = perplexity(model, dataset, args.batch_size, args.max_sequences, args.max_batches,
                         device, show, routing)
    except (DataError, EvalError) as e:
        sys.exit(f"megamor: eval: {e}")
    print(f"nll {res['nll']:.4f} | perplexity {res['perplexity']:.3f} | tokens {res['tokens']:,} "
          f"({res['sequences']} sequences) | routing {routing}")
    if "mean_depth" in res:
        steps = " / ".join(f"{f:.3f}" for f in res["fraction_per_step"])
        line = f"recursion: mean depth {res['mean_depth']:.3f} of {m.num_recursions}; tokens per step {steps}"
        if "threshold_topk_agreement" in res:
            line += "; threshold/top-k agreement " + " / ".join(
                f"{a:.3f}" for a in res["threshold_topk_agreement"])
        print(line)
    res.update({"checkpoint": str(ckpt), "step": step, "arch": m.arch,
                "routing_type": cfg.routing.type if m.arch == "mor" else None,
                "num_recursions": m.num_recursions, "data": spec, "split": split,
                "seq_length": dataset.seq_length, "batch_size": args.batch_size, "device": str(device)})
    _write(args.out, res)
    return 0


# ----------------------------------------------------------------------------- few-shot (lm_eval)


def go_offline() -> None:
    """Keep the Hugging Face libraries off the network (before they are imported: they read these
    variables once). A value the user set wins."""
    for k in OFFLINE_VARS:
        os.environ.setdefault(k, "1")


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (needs transformers and accelerate)
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError(f"lm-evaluation-harness with its Hugging Face backend is not installed "
                        f"({e}): pip install 'megamor[eval]'") from None
    return lm_eval, TaskManager


def _local_data_files(cfg: dict, yaml_dir: Path) -> Optional[dict]:
    """A copy of a task config whose relative `dataset_kwargs.data_files` that exist next to the
    task YAML point there (datasets would read them from the working directory); None if none."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        return None

    def fix(p):
        if isinstance(p, str) and not os.path.isabs(p) and (yaml_dir / p).exists():
            return str(yaml_dir / p)
        return p

    if isinstance(files, dict):
        new = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    elif isinstance(files, list):
        new = [fix(x) for x in files]
    else:
        new = fix(files)
    if new == files:
        return None
    return {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": new}}


def resolve_tasks(names: list[str], include_path: Optional[str]):
    """-> (TaskManager, task specs for simple_evaluate). Tasks are looked up under
    `include_path` first (fast: lm_eval's own 14k task files are indexed only when needed)."""
    _, TaskManager = _import_lm_eval()
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    local: list[str] = []
    tm = None
    if include_path:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path}: no such directory")
        tm = TaskManager(include_path=include_path, include_defaults=False)
        local = tm.all_tasks
    if tm is None or any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        where = (f"tasks under {include_path}: {', '.join(local) or 'none'}" if include_path
                 else "no --include-path given (a directory of task YAML files)")
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; {where}")
    specs: list[Any] = []
    for n in names:
        entry = tm.task_index[n]
        fixed = None
        if entry.kind == Kind.TASK and entry.yaml_path is not None:
            fixed = _local_data_files(load_yaml(entry.yaml_path, resolve_func=True, recursive=True),
                                      Path(entry.yaml_path).parent)
        specs.append(fixed if fixed is not None else n)
    return tm, specs


def few_shot(export_dir: str, tasks: list[str], include_path: Optional[str] = None,
             num_fewshot: Optional[int] = None, limit: Optional[float] = None, batch_size: int = 8,
             device: str = "cpu", dtype: str = "float32", log_samples: bool = False) -> dict:
    """lm-evaluation-harness on a Hugging Face model directory -> its results dict (JSON-ready)."""
    go_offline()
    export = Path(export_dir)
    if not (export / "config.json").is_file():
        raise EvalError(f"{export}: no config.json, not a Hugging Face model directory (export a "
                        f"checkpoint with `megamor convert to-hf CKPT DIR`)")
    lm_eval, _ = _import_lm_eval()
    tm, specs = resolve_tasks(tasks, include_path)
    try:
        res = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(export), "trust_remote_code": True, "dtype": dtype},
            tasks=specs, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
            task_manager=tm, log_samples=log_samples)
    except ConnectionError as e:  # offline: a task (or model) whose files are not on local disk
        raise EvalError(f"{e}: evaluation runs offline; give tasks whose data is local (a task "
                        f"YAML with dataset_path: json and data_files, in --include-path)") from None
    out = {"model": str(export), "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
           "results": res["results"], "n-samples": res.get("n-samples", {}),
           "versions": res.get("versions", {})}
    if log_samples:
        out["samples"] = {t: [{"doc_id": s["doc_id"], "target": s["target"],
                               "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                               **{k: s[k] for k in ("acc", "acc_norm") if k in s}}
                              for s in samples]
                          for t, samples in res.get("samples", {}).items()}
    return out


def format_table(results: dict) -> str:
    """One row per (task, metric): value, standard error, documents evaluated."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective", metrics.get("sample_len", "-"))
        for key, v in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(v, (int, float)):
                continue  # name, alias, sample_len, and the stderr that goes with a metric
            name, _, flt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{flt}")
            rows.append((task, name if flt == "none" else key, f"{v:.4f}",
                         f"{err:.4f}" if isinstance(err, (int, float)) else "-", str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_eval_hf(args) -> int:
    go_offline()
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if not tasks:
        sys.exit("megamor: eval --hf needs --tasks T1,T2")
    try:
        res = few_shot(args.hf, tasks, args.include_path, args.num_fewshot, args.limit,
                       args.batch_size, _device(args.device), args.dtype, args.log_samples)
    except EvalError as e:
        sys.exit(f"megamor: eval: {e}")
    print(format_table(res))
    _write(args.out, res)
    return 0


# ----------------------------------------------------------------------------- command


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("megamor: eval: --device cuda but no CUDA GPU is visible")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def _write(path: Optional[str], res: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def cmd_eval(args) -> int:
    if (args.checkpoint is None) == (args.hf is None):
        sys.exit("megamor: eval needs a checkpoint (perplexity) or --hf EXPORT_DIR (few-shot tasks)")
    if args.hf is not None:
        return cmd_eval_hf(args)
    if args.tasks:
        sys.exit("megamor: eval: --tasks runs on a Hugging Face export: megamor convert to-hf "
                 "CKPT DIR, then megamor eval --hf DIR --tasks ...")
    return cmd_eval_checkpoint(args)


def _limit(v: str) -> float:
    x = float(v)
    return int(x) if x >= 1 and x == int(x) else x


def add_parsers(sub) -> None:
    import argparse

    p = sub.add_parser("eval", help="validation perplexity of a checkpoint, or few-shot accuracy "
                                    "of a Hugging Face export (lm-evaluation-harness)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (or a checkpoint root: newest)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when a GPU is visible")
    p.add_argument("--out", help="also write the results as JSON to this file")
    g = p.add_argument_group("perplexity of a checkpoint")
    g.add_argument("--data", help="prepared data directory, a blend spec, or 'builtin' "
                                  "(default: the checkpoint's training data)")
    g.add_argument("--split", help="split to read (default: 'val' when the data has one, else 'train')")
    g.add_argument("--max-sequences", type=int, help="evaluate only the first N sequences")
    g.add_argument("--max-batches", type=int, help="evaluate only the first N batches")
    g.add_argument("--routing", choices=["threshold", "topk"], default="threshold",
                   help="threshold: causal inference routing (default); topk: training-time "
                        "expert-choice capacity routing, comparable with the training loss")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    h = p.add_argument_group("few-shot tasks of a Hugging Face export")
    h.add_argument("--hf", metavar="EXPORT_DIR", help="Hugging Face model directory (megamor "
                                                       "convert to-hf, or any causal LM)")
    h.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names")
    h.add_argument("--include-path", help="directory of task YAML files (local data)")
    h.add_argument("--num-fewshot", type=int, help="examples in the context (default: the task's, or 0)")
    h.add_argument("--limit", type=_limit, help="at most N documents per task (< 1: a fraction)")
    h.add_argument("--dtype", default="float32", help="weights dtype: float32 (default), bfloat16, auto")
    h.add_argument("--log-samples", action="store_true",
                   help="also write per-document log-likelihoods to --out")
    p.set_defaults(fn=cmd_eval)
