"""torchrun (`python -m torch.distributed.run`), without its own report of a failed rank.

megamor's ranks report their errors themselves, one line per distinct error
(megamor/errors.py); torchrun's multi-line report with its own traceback would bury that line.
A rank that died without reporting (killed by a signal) still gets one line here. The exit code
is the first failed rank's (a signal: 128 + its number).
"""

from __future__ import annotations

import logging
import signal
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: the rank could not report anything itself
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            print(f"megamor: rank {rank} (pid {failure.pid}) was killed by {name}",
                  file=sys.stderr, flush=True)
            return 128 - code
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
