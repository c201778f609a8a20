"""Which run a checkpoint directory belongs to, and what may be deleted from it.

A *lineage* is one run and every resume of it: a fresh start draws a new id, a resume keeps the
id of the checkpoint it loads, and every checkpoint records it (`"lineage"` in `megamor.json`;
checkpoints saved before lineages were recorded have none, read as "", and a run resumed from
one keeps "").

- **Ownership**: a run writes checkpoints only into a root that holds none of another lineage.
  A fresh run into a root with checkpoints is refused before any rank starts
  (`ownership_error`), unless `checkpoint.new_lineage=true`, which moves the other run's
  checkpoints, intact, into `<root>/previous/<time>/` first (`archive`).
- **Rotation** (`to_delete`): only the run's own checkpoints are candidates; kept are the newest
  `keep_last` by step, every multiple of `keep_every`, the checkpoint just saved and the newest
  complete one. Another lineage's checkpoints are never deleted.
- **Metrics** (`open_metrics`): `metrics.jsonl` is never overwritten. A fresh start moves an
  existing one aside (`metrics.<time>.jsonl`); a resume keeps the lines up to its step and moves
  the later ones (steps that will be trained again) to `metrics.replaced.jsonl`.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Optional

META = "megamor.json"
ARCHIVE = "previous"
_NAME = re.compile(r"^step_(\d{8})$")


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def lineage_of(meta: dict) -> str:
    return str(meta.get("lineage") or "")


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (`megamor.json` present) directly under
    `root`, by step."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _NAME.match(p.name)) and (p / META).is_file())


def read_lineage(path: Path) -> Optional[str]:
    try:
        return lineage_of(json.loads((path / META).read_text()))
    except (OSError, ValueError):
        return None  # unreadable: not this run's (never deleted, never claimed)


def foreign(root: Path, lineage: Optional[str]) -> list[Path]:
    """Complete checkpoints under `root` that are not of `lineage` (None: a fresh run, which
    owns none)."""
    return [p for _, p in complete_checkpoints(root)
            if lineage is None or read_lineage(p) != lineage]


def ownership_error(root: Path, others: list[Path], resuming: Optional[Path]) -> str:
    """The one line that refuses to write into a root holding `others`."""
    names = ", ".join(p.name for p in others[-3:]) + (" ..." if len(others) > 3 else "")
    what = (f"this run resumes {resuming}, another run's checkpoints are there too"
            if resuming is not None else "this is a fresh run")
    return (f"{root} holds checkpoints of another run ({names}) and {what}: resume that run "
            f"with --resume auto, choose another run.output_dir (or checkpoint.dir), or start a "
            f"new run there with checkpoint.new_lineage=true (the existing checkpoints are then "
            f"moved to {root / ARCHIVE}/<time>/, not deleted)")


def archive(root: Path, others: list[Path]) -> Path:
    """Move `others` (and the `latest` marker when it names one of them) into
    `<root>/previous/<time>/`; returns that directory."""
    dest = root / ARCHIVE / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    names = {p.name for p in others}
    for p in others:
        os.replace(p, dest / p.name)
    marker = root / "latest"
    if marker.is_file() and marker.read_text().strip() in names:
        os.replace(marker, dest / "latest")
    return dest


def to_delete(root: Path, lineage: str, keep_last: int, keep_every: int,
              just_saved: Path) -> list[Path]:
    """The run's own checkpoints that rotation removes (see the module docstring)."""
    own = [(s, p) for s, p in complete_checkpoints(root) if read_lineage(p) == lineage]
    keep = {p for _, p in own[-keep_last:]} | {just_saved}
    if own:
        keep.add(own[-1][1])  # the newest complete one
    if keep_every:
        keep |= {p for s, p in own if s % keep_every == 0}
    return [p for _, p in own if p not in keep]


# ----------------------------------------------------------------------------- metrics


def _aside(path: Path, stem: str) -> Path:
    dest = path.with_name(f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}.{n}.jsonl")
        n += 1
    return dest


def open_metrics(path: Path, resumed_step: Optional[int]):
    """`metrics.jsonl` opened for appending one line per step, without losing earlier lines:
    fresh (`resumed_step` None): an existing non-empty file is renamed to
    `metrics.<time>.jsonl`; resumed: lines after `resumed_step` move to
    `metrics.replaced.jsonl` (appended), so that no step appears twice."""
    if path.exists() and path.stat().st_size:
        if resumed_step is None:
            os.replace(path, _aside(path, path.stem))
        else:
            kept, later = [], []
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    step = None
                (kept if step is not None and step <= resumed_step else later).append(line)
            if later:
                with open(path.with_name(f"{path.stem}.replaced.jsonl"), "a") as f:
                    f.write("".join(l + "\n" for l in later))
                tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
                tmp.write_text("".join(l + "\n" for l in kept))
                os.replace(tmp, path)
    return open(path, "a")
