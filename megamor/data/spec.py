"""The data spec (``data.path``): comma-separated components ``[weight:]path``.

    /data/web                         one prepared directory
    0.7:/data/web,0.3:/data/code      blend with weights (normalised)
    /data/web,/data/code              no weights: proportional to size (a concatenation)

Standard library only: configuration validation parses specs without loading the data path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megamor.data.manifest import DataError

_WEIGHTED = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*:(.+)$")


@dataclass(frozen=True)
class DataComponent:
    weight: float | None
    path: Path


def parse_data_spec(spec: str | Sequence[Any]) -> list[DataComponent]:
    """Parse ``"0.7:/a,0.3:/b"`` (or a list of such strings / ``(weight, path)`` pairs /
    ``{"weight": w, "path": p}`` dicts) into components. Weights must be given for all
    components or for none."""
    items: list[Any]
    if isinstance(spec, (str, Path)):
        items = [s for s in str(spec).split(",") if s.strip()]
    else:
        items = list(spec)
    if not items:
        raise DataError(f"data spec {spec!r}: no dataset given")
    out: list[DataComponent] = []
    for item in items:
        if isinstance(item, dict):
            w, p = item.get("weight"), item.get("path")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            w, p = item
        else:
            m = _WEIGHTED.match(str(item))
            w, p = (m.group(1), m.group(2)) if m else (None, str(item))
        if not p or not str(p).strip():
            raise DataError(f"data spec {spec!r}: empty path in {item!r}")
        if w is not None:
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise DataError(f"data spec {spec!r}: weight {w!r} is not a number") from None
            if not w > 0 or not math.isfinite(w):
                raise DataError(f"data spec {spec!r}: weight {w} of {p} must be > 0")
        out.append(DataComponent(w, Path(str(p).strip()).expanduser()))
    given = [c.weight is not None for c in out]
    if any(given) and not all(given):
        raise DataError(f"data spec {spec!r}: give a weight to every component or to none")
    return out
