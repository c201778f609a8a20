"""Generation requests and results; the JSONL input of `megamor generate`.

An input line is a JSON object with `prompt` (text) or `prompt_ids` (token ids) and optional
per-request settings (`REQUEST_FIELDS`); anything else is an error naming the line and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

# How an engine step orders recursion depths (megamor/generation/engine.py).
SCHEDULES = ("depthwise", "synchronous")


class RequestError(ValueError):
    """A request that cannot be served; the message names the line (or request), field and value."""


REQUEST_FIELDS = {
    "prompt": "text to continue",
    "prompt_ids": "token ids to continue (instead of prompt)",
    "max_new_tokens": "tokens to generate at most (default: --max-new-tokens)",
    "stop_token_ids": "token ids that end the request (default: the model's EOS; [] for none)",
    "temperature": "0 = greedy (default); > 0 samples",
    "top_k": "sample among the k most likely tokens (0 = all)",
    "top_p": "sample from the smallest set of tokens whose probability reaches p (1 = all)",
    "seed": "seed of this request's sampling generator (default 0)",
    "id": "any JSON value, copied to the output line",
}


@dataclass
class Request:
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    id: Any = None
    where: str = field(default="", repr=False, compare=False)  # "FILE:LINE" for error messages

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> "Request":
        w = self.where or "request"
        if (self.prompt is None) == (self.prompt_ids is None):
            raise RequestError(f"{w}: give exactly one of 'prompt' and 'prompt_ids'")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise RequestError(f"{w}: field 'prompt' must be a string, got {self.prompt!r}")
        if self.prompt_ids is not None and not (
                isinstance(self.prompt_ids, list) and all(_is_int(i) and i >= 0 for i in self.prompt_ids)):
            raise RequestError(f"{w}: field 'prompt_ids' must be a list of token ids, got "
                               f"{self.prompt_ids!r}")
        if self.max_new_tokens is not None and not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise RequestError(f"{w}: field 'max_new_tokens' must be an integer >= 1, got "
                               f"{self.max_new_tokens!r}")
        if self.stop_token_ids is not None and not (
                isinstance(self.stop_token_ids, list) and all(_is_int(i) for i in self.stop_token_ids)):
            raise RequestError(f"{w}: field 'stop_token_ids' must be a list of token ids, got "
                               f"{self.stop_token_ids!r}")
        if not (_is_num(self.temperature) and self.temperature >= 0):
            raise RequestError(f"{w}: field 'temperature' must be a number >= 0, got {self.temperature!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise RequestError(f"{w}: field 'top_k' must be an integer >= 0, got {self.top_k!r}")
        if not (_is_num(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"{w}: field 'top_p' must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.seed):
            raise RequestError(f"{w}: field 'seed' must be an integer, got {self.seed!r}")
        return self


@dataclass
class Result:
    index: int  # position of the request in the input
    request: Request
    prompt_ids: list[int]
    tokens: list[int]  # generated ids, the stop token included when one ended the request
    completion: str | None  # text of the generated tokens (stop token excluded); None: no tokenizer
    finish_reason: str  # stop | length | context

    def to_json(self) -> dict:
        out = {}
        if self.request.id is not None:
            out["id"] = self.request.id
        prompt = self.request.prompt if self.request.prompt is not None else self.request.prompt_ids
        out.update(prompt=prompt, completion=self.completion, tokens=self.tokens,
                   finish_reason=self.finish_reason, prompt_tokens=len(self.prompt_ids))
        return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def request_from_dict(obj, where: str) -> Request:
    if not isinstance(obj, dict):
        raise RequestError(f"{where}: expected a JSON object like {{\"prompt\": ...}}, got "
                           f"{type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"{where}: unknown field {unknown[0]!r} (allowed: "
                           f"{', '.join(REQUEST_FIELDS)})")
    known = {k: v for k, v in obj.items() if v is not None or k == "id"}
    return Request(**known, where=where).check()


def parse_jsonl(lines: Iterable[str], source: str) -> list[Request]:
    """Requests of a JSONL text (blank lines skipped); errors name `source:LINE`."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(request_from_dict(obj, where))
    if not out:
        raise RequestError(f"{source}: no requests (expected one JSON object per line)")
    return out


__all__ = ["REQUEST_FIELDS", "Request", "RequestError", "Result", "parse_jsonl",
           "request_from_dict"]
