"""MoR generation engine: continuous batching of requests and depth-wise batching of recursion
steps over a paged KV cache (docs/generation.md).

    from megamor.generation import Engine, Request
    engine = Engine.load("hf/mor", max_batch=32)
    for r in engine.generate([Request(prompt="The module", max_new_tokens=20)]):
        print(r.completion)
"""

from megamor.generation.engine import Engine, EngineConfig, SCHEDULES
from megamor.generation.requests import Request, RequestError, Result, parse_jsonl

__all__ = ["Engine", "EngineConfig", "Request", "RequestError", "Result", "SCHEDULES", "parse_jsonl"]
