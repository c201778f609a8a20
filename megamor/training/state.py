"""Where a run is, as a checkpoint keeps it: the step, the LR schedule, the RNG, step health and
the tracking run (`TrainState`, a stateful part of `megamor.checkpoint.RunState`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megamor.checkpoint import rng_state, set_rng_state
from megamor.schedule import plan_resume, saved_schedule


class TrainState:
    """The step (optimizer steps done), the LR schedule driving the engine's optimizer, step
    health (megamor/step_health.py) and the MLflow run that a resume continues."""

    def __init__(self, train_cfg, scheduler, health):
        self.train_cfg, self.scheduler, self.health = train_cfg, scheduler, health
        self.step = 0
        self.tracking_run_id: Optional[str] = None
        self.tracker = None  # the run's tracker (set by the loop): its id wins when it has one
        self.schedule_note: Optional[str] = None  # set when a resume extends or re-plans it

    def state_dict(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "tracking_run_id": self.run_id(), "step_health": self.health.state()}

    def run_id(self) -> Optional[str]:
        """The tracker's run id: a run created after start-up (the store was down then) is the
        one a resume continues; else the id this run started or resumed with."""
        return (self.tracker.run_id if self.tracker is not None else None) or self.tracking_run_id

    def load_state_dict(self, meta: dict, checkpoint: Path) -> None:
        """After the engine restored weights and optimizer state: the LR schedule (kept,
        extended or re-planned, megamor/schedule.py), RNG, step health, step, tracking run."""
        t = self.train_cfg
        for group in self.scheduler.optimizer.param_groups:  # restored with the saved run's values
            group["max_lr"], group["min_lr"] = t.lr, t.min_lr
        saved, saved_state = saved_schedule(checkpoint, meta)
        plan = plan_resume(saved, saved_state, t, meta["step"], checkpoint)
        if plan.action == "keep":
            self.scheduler.load_state_dict(saved_state)
        else:  # the configured schedule, at the saved position
            self.scheduler.step(increment=saved_state["num_steps"])
            self.schedule_note = plan.message
        set_rng_state(meta["rng"])
        self.health.load(meta.get("step_health"))
        self.step = meta["step"]
        self.tracking_run_id = meta.get("tracking_run_id")
