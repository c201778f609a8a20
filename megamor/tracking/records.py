"""What megamor sends to MLflow, as plain data: config params flattened, metric items with
names MLflow accepts, the local store's default URI, system samples, and the unsent file read
back. No MLflow import here (megamor/tracking/__init__.py delivers)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

PARAM_VALUE_LIMIT = 500
TAG_VALUE_LIMIT = 5000
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
_PARAMS_PER_BATCH = 100
_TAGS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")
STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten_config(config: Mapping[str, Any], prefix: str = "",
                   limit: int = PARAM_VALUE_LIMIT) -> dict[str, str]:
    """Nested dict -> {"section.option": "value"}; values stringified and cut to `limit` chars."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name, limit))
        else:
            text = str(value)
            out[name] = text if len(text) <= limit else text[:limit]
    return out


def metric_items(metrics: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Numeric items of a metrics dict as (key, float): lists/tuples become `key/<i>`, bools 0/1,
    anything non-numeric (strings, None) is left out, as is a key named `step`. Characters MLflow
    refuses in metric names are replaced by `_`."""
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        if key == "step":
            continue
        key = _BAD_KEY_CHARS.sub("_", str(key))
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                f = _as_float(v)
                if f is not None:
                    out.append((f"{key}/{i}", f))
            continue
        f = _as_float(value)
        if f is not None:
            out.append((key, f))
    return out


def _as_float(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    item = getattr(v, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(v, "ndim", 1) == 0:
        try:
            return float(item())
        except (TypeError, ValueError):
            return None
    return None


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class _SystemSampler:
    """CPU/RAM numbers through psutil, if installed; otherwise nothing."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil = psutil
        self.proc = psutil.Process()
        psutil.cpu_percent(None)  # prime: the next call averages since now

    def sample(self) -> dict[str, float]:
        if self.psutil is None:
            return {}
        try:
            vm = self.psutil.virtual_memory()
            return {"system/cpu_percent": float(self.psutil.cpu_percent(None)),
                    "system/memory_percent": float(vm.percent),
                    "system/memory_used_gb": (vm.total - vm.available) / 2**30,
                    "system/process_rss_gb": self.proc.memory_info().rss / 2**30}
        except Exception:  # a sampling problem is never worth an exception in the train loop
            return {}


def read_unsent(path: Path) -> Iterable[dict]:
    """Entries of an `mlflow-unsent.jsonl` written by `Tracker.finish`."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
