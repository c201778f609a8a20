"""MoR generation engine: continuous batching of requests and depth-wise batching of recursion
steps over a paged KV cache (docs/generation.md).

    from megamor.generation import Engine, Request
    engine = Engine.load("hf/mor", max_batch=32)
    for r in engine.generate([Request(prompt="The module", max_new_tokens=20)]):
        print(r.completion)
"""


from megamor.lazy_exports import lazy_exports

# Resolved on first use, so that `megamor --help` (which registers `generate`) loads no torch.
_EXPORTS = {"Engine": "engine", "EngineConfig": "engine", "SCHEDULES": "requests",
            "Request": "requests", "RequestError": "requests", "Result": "requests",
            "parse_jsonl": "requests"}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
