"""MoR generation engine: continuous batching of requests and depth-wise batching of recursion
steps over a paged KV cache (docs/generation.md).

    from megamor.generation import Engine, Request
    engine = Engine.load("hf/mor", max_batch=32)
    for r in engine.generate([Request(prompt="The module", max_new_tokens=20)]):
        print(r.completion)
"""


import importlib
from typing import Any

# Resolved on first use, so that `megamor --help` (which registers `generate`) loads no torch.
_EXPORTS = {"Engine": "engine", "EngineConfig": "engine", "SCHEDULES": "requests",
            "Request": "requests", "RequestError": "requests", "Result": "requests",
            "parse_jsonl": "requests"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
