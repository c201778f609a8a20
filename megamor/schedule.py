"""The learning-rate schedule: megatron's OptimizerParamScheduler built from `train.*`, and what
happens to it when a run is resumed with other schedule options.

The schedule counts samples (megatron's convention): after optimizer step k it sits at
k x global_batch_size samples, and the LR it then gives is the one step k + 1 uses.

Resume. megatron restores the checkpoint's schedule and ignores the configuration, so raising
`train.train_steps` on resume used to leave the old horizon in place (LR 0 past it). Here the
schedule always follows the configuration:

- unchanged options: the saved state is restored as is;
- changed options that give every step already trained the same LR and weight decay (raising
  `train_steps` of a WSD run before its decay has started, `min_lr`, `decay_fraction` ...): the
  run continues exactly as a run planned with the new options from the start ("extended");
- changed options that would have given trained steps another LR (the decay has started, `lr`
  or `warmup_steps` changed, cosine `train_steps` ...): refused with a `ScheduleError` naming
  the options, unless `train.on_schedule_change=replan`, which applies the new schedule from the
  current step on (its LR at this step; the LR jumps there, and the message says from what to
  what).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megamor.config import ConfigError, TrainConfig

# The train.* options that decide the LR / weight-decay schedule.
SCHEDULE_OPTIONS = ("lr", "min_lr", "lr_schedule", "warmup_steps", "decay_fraction",
                    "train_steps", "weight_decay", "global_batch_size")
_STYLE = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}


class ScheduleError(ConfigError):
    """Resuming with these schedule options would rewrite the LR of steps already trained."""


def scheduler_args(t: TrainConfig) -> dict:
    """OptimizerParamScheduler's keyword arguments (all but the optimizer) for `t`."""
    samples = t.train_steps * t.global_batch_size
    style = _STYLE[t.lr_schedule]
    return dict(
        init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps * t.global_batch_size, lr_decay_steps=samples,
        lr_decay_style=style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=samples, wd_incr_style="constant",
        wsd_decay_steps=int(round(t.decay_fraction * samples)) if style == "WSD" else None,
        lr_wsd_decay_style="linear" if style == "WSD" else None)


def build_scheduler(optimizer, t: TrainConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    return OptimizerParamScheduler(optimizer, **scheduler_args(t))


def _detached(t: TrainConfig, saved_state: Optional[dict] = None):
    """A scheduler over a stand-in optimizer with one parameter group (to evaluate LRs)."""
    s = build_scheduler(types.SimpleNamespace(param_groups=[{}]), t)
    if saved_state is not None:
        s.load_state_dict({**saved_state, "num_steps": 0})  # megatron's: the saved values win
        s.step(0)  # load_state_dict sets the weight decay after computing the groups' values
    return s


def lr_at(t: TrainConfig, step: int) -> float:
    """The LR the schedule of `t` gives after `step` optimizer steps (what step + 1 uses)."""
    s = _detached(t)
    s.step(step * t.global_batch_size)
    return s.optimizer.param_groups[0]["lr"]


def first_decay_step(t: TrainConfig) -> Optional[int]:
    """The first optimizer step trained at a WSD-decayed LR (None for other schedules)."""
    if t.lr_schedule != "wsd":
        return None
    a = scheduler_args(t)
    return (a["lr_decay_steps"] - a["wsd_decay_steps"]) // t.global_batch_size + 2


def _first_difference(old, old_gbs: int, new, new_gbs: int, steps: int) -> Optional[int]:
    """First optimizer step (1-based) among `steps` whose LR or weight decay differs."""
    g_old, g_new = old.optimizer.param_groups[0], new.optimizer.param_groups[0]
    for k in range(1, steps + 1):
        if g_old["lr"] != g_new["lr"] or g_old["weight_decay"] != g_new["weight_decay"]:
            return k
        old.step(old_gbs)
        new.step(new_gbs)
    return None


@dataclass
class ScheduleResume:
    """What resuming does to the schedule: `action` is "keep", "extend" or "replan"."""

    action: str
    changed: dict  # option -> (saved value, new value)
    message: str = ""


def plan_resume(saved: TrainConfig, saved_state: dict, now: TrainConfig, step: int,
                checkpoint: Path) -> ScheduleResume:
    """Decide what a run resumed at `step` from `checkpoint` (schedule options `saved`, scheduler
    state `saved_state` from its megamor.json) does with the schedule options `now`; raises
    ScheduleError when the trained steps' LR would change and `now.on_schedule_change` is
    "error"."""
    changed = {k: (getattr(saved, k), getattr(now, k)) for k in SCHEDULE_OPTIONS
               if getattr(saved, k) != getattr(now, k)}
    if not changed:
        return ScheduleResume("keep", {})
    what = ", ".join(f"train.{k} {a} -> {b}" for k, (a, b) in changed.items())
    diff = _first_difference(_detached(saved, saved_state), saved.global_batch_size,
                             _detached(now), now.global_batch_size, step)
    if diff is None:
        note = f"schedule extended at step {step}: {what}; steps 1-{step} had the same LR under " \
               f"both, so the LR continues as if the new values had been set from the start"
        ds = first_decay_step(now)
        if ds is not None and ds <= now.train_steps:
            note += f" (WSD decay from step {ds} of {now.train_steps})"
        return ScheduleResume("extend", changed, note)
    old_lr = _detached(saved, saved_state)
    old_lr.step(saved_state["num_steps"])
    new_lr, was = lr_at(now, step), old_lr.optimizer.param_groups[0]["lr"]
    if now.on_schedule_change == "replan":
        return ScheduleResume("replan", changed,
                              f"schedule re-planned at step {step}: {what}; the new schedule "
                              f"applies from step {step + 1} on (its LR there is {new_lr:.3e}; "
                              f"the saved schedule's was {was:.3e})")
    jump = f"the LR of step {step + 1} would be {new_lr:.3e} instead of {was:.3e}"
    hint = ""
    if diff > 1:  # an earlier checkpoint can take the new options as an extension
        hint = (f"; both schedules agree up to step {diff - 1}: resuming from a checkpoint saved "
                f"at or before it extends the run exactly (checkpoint.keep_every keeps such "
                f"checkpoints)")
        early = _checkpoints_up_to(checkpoint.parent, diff - 1)
        if early:
            hint += f", e.g. {early[-1]}"
    keep = " ".join(f"train.{k}={a}" for k, (a, _) in changed.items())
    raise ScheduleError(
        f"resuming {checkpoint} at step {step} with {what} changes the learning rate or weight "
        f"decay of steps already trained (from step {diff} on){hint}. Resume with the saved "
        f"values ({keep}), or set train.on_schedule_change=replan to follow the new schedule "
        f"from step {step + 1} ({jump})")


def _checkpoints_up_to(root: Path, step: int) -> list[Path]:
    from megamor.checkpoint import _NAME, is_complete
    found = sorted((int(m.group(1)), p) for p in root.glob("step_*")
                   if (m := _NAME.match(p.name)) and is_complete(p) and int(m.group(1)) <= step)
    return [p for _, p in found]


def saved_schedule(checkpoint: Path, meta: dict) -> tuple[TrainConfig, dict]:
    """The schedule options a checkpoint was trained with (its config.yaml) and its saved
    scheduler state (megamor.json)."""
    from megamor.checkpoint_meta import CheckpointError
    from megamor.config import load_config
    try:
        train = load_config(checkpoint / "config.yaml").train
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint / 'config.yaml'}: cannot read the saved config: {e}") \
            from None
    if "scheduler" not in meta:
        raise CheckpointError(f"{checkpoint / 'megamor.json'}: no 'scheduler' entry")
    return train, meta["scheduler"]
