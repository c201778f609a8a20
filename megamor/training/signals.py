"""Stop signals during training (docs/checkpoints.md): SIGTERM, SIGUSR1 and Ctrl-C's SIGINT are
noted when they arrive and acted on at the end of a step, by every rank together (the loop saves
a checkpoint and exits with EXIT_PREEMPTED). A second Ctrl-C, at least a second after the first
(`lifecycle.InterruptCounter`: not one keypress forwarded twice), stops at once."""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

from megamor.lifecycle import STOP_SIGNALS, InterruptCounter


class StopSignals:
    def __init__(self, enabled: bool):
        """`enabled` (checkpoint.save_on_signal): install the handlers now, first thing in a
        rank, so that a signal during start-up is honoured after the first step."""
        self.enabled = enabled
        self.received: Optional[int] = None
        self._interrupts = InterruptCounter()
        if enabled:
            for s in STOP_SIGNALS:
                signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._interrupts.second() and self.received == signal.SIGINT:
            # A second Ctrl-C: stop now; an unfinished save stays an invisible .tmp directory.
            print("megamor: interrupted twice: stopping without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(130)
        self.received = signum

    def agreed(self, device: torch.device) -> int:
        """The stop signal any rank got, on every rank; 0 if none (or not enabled). One tiny
        all-reduce per step."""
        if not self.enabled:
            return 0
        flag = torch.tensor([float(self.received or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
