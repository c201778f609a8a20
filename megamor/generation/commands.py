"""`megamor generate`: continuous, depth-wise batched generation over a JSONL stream of prompts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _read_prompts(arg: str):
    from megamor.generation.requests import RequestError, parse_jsonl

    if arg == "-":
        return parse_jsonl(sys.stdin.read().splitlines(), "<stdin>")
    p = Path(arg)
    if not p.is_file():
        raise RequestError(f"--prompts {arg}: no such file")
    return parse_jsonl(p.read_text(encoding="utf-8").splitlines(), str(p))


def cmd_generate(args) -> int:
    from megamor.checkpoint import CheckpointError
    from megamor.generation import Engine, RequestError
    from megamor.generation.loading import LoadError

    try:
        requests = _read_prompts(args.prompts)  # every line checked before the model loads
        engine = Engine.load(args.model, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                             block_size=args.block_size, prefill_chunk=args.prefill_chunk,
                             schedule=args.schedule,
                             kv_cache_bytes=int(args.kv_cache_mb * 2**20) if args.kv_cache_mb else None)
        engine.prepare(requests)  # every prompt tokenized and checked before any generation
        lines = _write(engine, requests, args.out)
    except (RequestError, LoadError, CheckpointError, ValueError) as e:
        sys.exit(f"megamor: generate: {e}")
    st = engine.stats.summary()
    print(f"generated {st['generated']} tokens for {lines} requests in {st['seconds']:.2f} s "
          f"({st['tokens_per_s']:.1f} tok/s; {st['steps']} steps, {st['mean_in_flight']:.1f} "
          f"sequences in flight on average, {st['layer_passes_per_decoded_token']:.2f} layer "
          f"passes per decoded token, KV peak {st['kv_peak_page_bytes'] / 2**20:.2f} MiB, "
          f"{st['preemptions']} preemptions)", file=sys.stderr)
    return 0


def _write(engine, requests, out: str | None) -> int:
    """Output lines in input order: streamed to stdout, or written to `out` atomically."""
    if out is None:
        pending, nxt = {}, 0
        for r in engine.stream(requests):
            pending[r.index] = r
            while nxt in pending:
                print(json.dumps(pending.pop(nxt).to_json(), ensure_ascii=False), flush=True)
                nxt += 1
        return nxt
    path = Path(out)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        results = engine.generate(requests)
        with open(tmp, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(results)


def add_parsers(sub) -> None:
    from megamor.generation.requests import REQUEST_FIELDS, SCHEDULES

    fields = "; ".join(f"{k}: {v}" for k, v in REQUEST_FIELDS.items())
    p = sub.add_parser(
        "generate", help="generate for a stream of prompts (continuous depth-wise batching)",
        description="Generate continuations for JSONL prompts, one object per line, with "
                    f"optional per-request settings ({fields}). Output: one JSON line per "
                    "request, in input order, with prompt, completion, tokens, finish_reason.")
    p.add_argument("model", help="megamor checkpoint (or checkpoint root: newest) or exported "
                                 "Hugging Face directory")
    p.add_argument("--prompts", required=True, help="JSONL file of requests, or - for stdin")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default per request")
    p.add_argument("--max-batch", type=int, default=32, help="sequences in flight at most")
    p.add_argument("--out", help="write the results here (default: stdout)")
    p.add_argument("--kv-cache-mb", type=float, default=None,
                   help="KV-cache budget in MiB (default: grows as needed); sequences beyond it "
                        "wait, and the newest is preempted and recomputed when the cache is full")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine item")
    p.add_argument("--schedule", choices=SCHEDULES, default="depthwise",
                   help="depthwise: one shared-block call per step over every depth; "
                        "synchronous: every depth of a step in turn (for comparison)")
    p.set_defaults(fn=cmd_generate)
