"""Next-token choice for one request: greedy (argmax, as `generate(do_sample=False)`), or
sampling with temperature, top-k and top-p from the request's own seeded generator, so that a
request's tokens do not depend on the other requests in flight."""

from __future__ import annotations

import torch

from megamor.generation.requests import Request


def new_generator(request: Request) -> torch.Generator | None:
    if request.greedy:
        return None
    return torch.Generator().manual_seed(request.seed)


def sample(logits: torch.Tensor, request: Request, generator: torch.Generator) -> int:
    """logits [vocab] (any dtype) -> a token id."""
    scores = logits.float() / request.temperature
    if request.top_k and request.top_k < scores.numel():
        kth = torch.topk(scores, request.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if request.top_p < 1.0:
        order = torch.argsort(scores, descending=True)
        probs = torch.softmax(scores[order], dim=-1)
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        drop = (probs.cumsum(0) - probs) >= request.top_p
        scores = scores.index_put((order[drop],), torch.tensor(float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
