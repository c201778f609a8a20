"""MLflow experiment tracking from one rank, built so that tracking can never stop training.

Usage (rank 0 only; every other rank, or tracking switched off, gets a `NullTracker`)::

    tracker = Tracker()
    run_id = tracker.start(run_dir, cfg.to_dict(), tracking_uri=None, experiment="megamor",
                           run_name="360m-mor", run_id=checkpointed_run_id)  # None: new run
    for each logged step:  tracker.log_metrics(step, {"loss": ..., "lr": ...})
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.finish("FINISHED")  # or "FAILED" / "KILLED"

Store. `tracking_uri` if given, else the `MLFLOW_TRACKING_URI` environment variable, else a
local SQLite store `sqlite:///<run_dir>/mlflow.db` with artifacts under
`<run_dir>/mlruns-artifacts` (no server; browse with `mlflow ui --backend-store-uri ...`).

Configuration. The nested config dict is logged as params `section.option` (values as strings,
truncated to 500 characters). On a resumed run, params already present with the same value are
skipped (MLflow params are immutable); a changed value is recorded as the tag
`megamor.param_changed.<key>` = "old -> new" instead of failing.

System metrics. When `psutil` is importable, every `log_metrics` call adds `system/cpu_percent`
(whole machine, averaged since the previous call), `system/memory_percent`,
`system/memory_used_gb` and `system/process_rss_gb` (this process) at the same step. Sampled
in-process on the caller's thread at each call, so it works offline and shares the training step
axis. (MLflow's own system-metrics monitor runs a thread per run that samples and talks to the
store on its own schedule and step axis; that is what we avoid.)

Metric contract (resume without duplicated or missing steps). Per metric key, steps are strictly
increasing: a (key, step) at or below the highest step already logged for that key is dropped and
counted in `skipped`. On `start(run_id=...)` the highest step per key is read back from the store,
so a trainer resumed from a checkpoint at step S may simply log every step from S + 1 on: steps
that the interrupted attempt had already delivered (S + 1 .. S') are not logged twice (the first
attempt's values are kept), and later steps are appended. Steps the interrupted attempt never
delivered are logged by the resumed one, so nothing is missing either.

Delivery off the caller's thread. `log_metrics`, `set_tags` and `log_artifact` only append to
in-memory buffers (under a lock that is never held while talking to the store) and wake a
sender thread (`megamor-mlflow-sender`, a daemon), which sends everything buffered in batches
(MLflow's `log_batch` limits). A slow or stalled store therefore delays the delivery, never the
training step; `pending` counts what is not delivered yet and `backlog` the same while delivery
is failing or more than `stall_s` late (the console's "mlflow N metrics buffered").
`start()` waits for the run to be created or resumed (from a server at most about
`request_timeout_s`; a local store as long as it takes), not for its params. Why not MLflow's own asynchronous logging (`log_batch(..., synchronous=False)`,
`MLFLOW_ENABLE_ASYNC_LOGGING`): it sends each batch from a pool of up to 10 threads with no
backoff and no retry (a failed batch is logged and dropped), its queue is unbounded, its flush
and exit hook wait without a bound, and artifacts go through a separate queue; the contracts
below need one sender that keeps what failed. The sender asks MLflow for synchronous requests
explicitly, so `MLFLOW_ENABLE_ASYNC_LOGGING=true` in the environment changes nothing.
`Tracker(background=False)` delivers on the caller's thread instead (for comparison;
benchmarks/tracking_data_wait.py).

Failures. Every delivery catches every error of the tracking store (server down, network, disk):
the first failure of a burst logs one warning, the data stay in a bounded buffer (`buffer_size`
metrics, oldest dropped first and counted in `lost`), and delivery is retried once an exponential
backoff (1 s doubling to 60 s) has passed; a success after a burst logs how much was delivered.
`failures` counts failed delivery attempts. MLflow's HTTP client is set (unless the environment
already says otherwise) to 0 internal retries and a 10 s timeout, so a dead server costs one
fast failed request per backoff period, and a stalled one one request per `request_timeout_s`,
not minutes of blocking. `flush()` forces an attempt now and waits for it (bounded);
`finish()` forces a last delivery, marks the run terminated, and returns a report, waiting at
most `finish_timeout_s` (default: two timed-out requests and a pause, what the synchronous
tracker could take); metrics that still could not be delivered are written to
`<run_dir>/mlflow-unsent.jsonl` and counted as lost (a request still hanging at that point is
written there too: if the store later applies it, those metrics exist in both places, never in
neither). If the run itself could not be created at `start()` (store unreachable), creation is
retried like any other delivery and `run_id` stays None until it succeeds: read
`tracker.run_id` when checkpointing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Optional

from megamor.tracking.records import (_METRICS_PER_BATCH, _PARAMS_PER_BATCH, _TAGS_PER_BATCH,
                                      PARAM_VALUE_LIMIT, STATUSES, TAG_VALUE_LIMIT,
                                      _SystemSampler, default_tracking_uri, flatten_config,
                                      metric_items, read_unsent)

__all__ = ["NullTracker", "PARAM_VALUE_LIMIT", "STATUSES", "TAG_VALUE_LIMIT", "Tracker",
           "create_tracker", "default_tracking_uri", "flatten_config", "metric_items",
           "read_unsent"]

log = logging.getLogger("megamor.tracking")


class NullTracker:
    """The tracker of non-logging ranks, or of runs with tracking switched off."""

    run_id: Optional[str] = None
    failures = 0
    lost = 0
    skipped = 0

    def start(self, run_dir: Path, config_dict: dict, tracking_uri: Optional[str] = None,
              experiment: str = "megamor", run_name: Optional[str] = None,
              run_id: Optional[str] = None) -> Optional[str]:
        return None

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def flush(self, force: bool = True, timeout: Optional[float] = None) -> bool:
        return True

    def last_logged_step(self, key: Optional[str] = None) -> Optional[int]:
        return None

    @property
    def pending(self) -> int:
        return 0

    @property
    def backlog(self) -> int:
        return 0

    def finish(self, status: str = "FINISHED") -> dict:
        return {"run_id": None, "status": status, "failures": 0, "lost_metrics": 0,
                "lost_artifacts": 0, "skipped": 0}


class Tracker:
    """MLflow tracking for one process; see the module docstring for the contracts.

    ``background=True`` (default): a sender thread talks to the store; the caller's thread only
    appends to the buffers. ``background=False``: deliveries run on the caller's thread (each
    call may wait up to ``request_timeout_s`` on a stalled store; kept for comparison)."""

    def __init__(self, buffer_size: int = 100_000, request_timeout_s: int = 10,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
                 system_metrics: bool = True, finish_attempts: int = 2,
                 background: bool = True, finish_timeout_s: Optional[float] = None,
                 stall_s: float = 2.0) -> None:
        self.buffer_size = buffer_size
        self.request_timeout_s = request_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.finish_attempts = finish_attempts
        self.background = background
        # The longest `finish` (and a forced `flush`) waits for deliveries: by default what the
        # synchronous tracker could take, one timed-out request per attempt plus the pauses.
        self.finish_timeout_s = (finish_timeout_s if finish_timeout_s is not None
                                 else max(1, finish_attempts) * (request_timeout_s + 1.0))
        self.stall_s = stall_s
        self.system = _SystemSampler() if system_metrics else None
        self.client = None
        self.run_id: Optional[str] = None
        self.tracking_uri: Optional[str] = None
        self.run_dir: Optional[Path] = None
        self.failures = 0  # failed delivery attempts
        self.lost = 0  # metrics dropped: buffer overflow, or undeliverable at finish
        self.lost_artifacts = 0
        self.skipped = 0  # (key, step) at or below the key's highest logged step
        self.sent = 0  # metrics delivered
        # Shared between the caller's thread and the sender: guarded by _lock, never held
        # while talking to the store.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._metrics: deque = deque()  # mlflow.entities.Metric, oldest first
        self._inflight: list = []  # metrics of the log_batch request in progress
        self._params: list = []
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[str, Optional[str]]] = []
        self._last_step: dict[str, int] = {}  # key -> highest step logged (store or this session)
        self._terminal: Optional[str] = None
        # The sender's (or, without one, the caller's) delivery state.
        self._need_setup = False
        self._resume = False
        self._experiment = "megamor"
        self._run_name: Optional[str] = None
        self._in_burst = False
        self._burst_failures = 0
        self._backoff = backoff_initial_s
        self._next_try = 0.0
        self._finished = False
        self._sender: Optional[threading.Thread] = None
        self._requested = 0  # forced delivery attempts asked for (flush)
        self._served = 0  # ... and those a completed attempt has answered
        self._attempts = 0  # delivery attempts completed

    # ------------------------------------------------------------------ public API

    def start(self, run_dir: Path, config_dict: dict, tracking_uri: Optional[str] = None,
              experiment: str = "megamor", run_name: Optional[str] = None,
              run_id: Optional[str] = None) -> Optional[str]:
        """Create (or, with `run_id`, resume) the run and queue the config as params.

        Returns the run id, or None when the store could not be reached within about
        `request_timeout_s` (creation is retried later; `self.run_id` holds the id once it
        exists). The params, tags and artifacts are delivered in the background.
        """
        from mlflow.entities import Param  # imported here: mlflow costs ~2 s to import

        # MLflow's HTTP client retries 7 times with exponential backoff and a 120 s timeout by
        # default: minutes of blocking per call when the server is down. This module buffers
        # and retries itself, so the client should fail fast (unless the user chose otherwise).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.request_timeout_s))
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self._default_store = self.tracking_uri is None
        if self._default_store:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tracking_uri = default_tracking_uri(self.run_dir)
        self._experiment, self._run_name = experiment, run_name
        self.run_id, self._resume = run_id, run_id is not None
        with self._lock:
            self._params = [Param(k, v) for k, v in flatten_config(config_dict).items()]
            self._need_setup = True
            self._finished = False
            self._terminal = None
        if not self.background:
            self.flush(force=True)
            return self.run_id
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(target=self._send_loop, name="megamor-mlflow-sender",
                                            daemon=True)
            self._sender.start()
        # Wait for the run to exist (or for the first attempt to fail), not for the params: a
        # server gets about one request's timeout; a local store (SQLite, files: creating its
        # tables takes seconds) is waited for, as before the sender existed.
        remote = self.tracking_uri.split(":", 1)[0].lower() in ("http", "https", "databricks")
        deadline = time.monotonic() + self.request_timeout_s + 1.0 if remote else math.inf
        with self._wake:
            attempts = self._attempts
            self._wake.notify_all()
            while self._need_setup and self._attempts == attempts and self._sender.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(min(left, 1.0))
        return self.run_id

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue the numeric entries of `metrics` at `step` (plus system metrics) for delivery;
        never waits for the store."""
        from mlflow.entities import Metric

        step = int(step)
        now = int(time.time() * 1000)
        items = metric_items(metrics)
        if self.system is not None:
            items += list(self.system.sample().items())
        with self._lock:
            for key, value in items:
                if step <= self._last_step.get(key, -(2**62)):
                    self.skipped += 1
                    continue
                self._last_step[key] = step
                self._metrics.append(Metric(key, value, now, step))
            self._trim()
        self.flush(force=False)

    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None:
        """Upload a file or directory (retried like metrics if the store is unreachable)."""
        p = Path(path)
        if not p.exists():
            log.warning("tracking: artifact %s does not exist; not logged", p)
            return
        with self._lock:
            self._artifacts.append((str(p), artifact_path))
            while len(self._artifacts) > 1000:
                self._artifacts.pop(0)
                self.lost_artifacts += 1
        self.flush(force=False)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._lock:
            for k, v in tags.items():
                text = str(v)
                self._tags[str(k)] = text[:TAG_VALUE_LIMIT]
        self.flush(force=False)

    @property
    def pending(self) -> int:
        """Metrics not delivered yet (buffered, or in a request still in progress)."""
        with self._lock:
            return len(self._metrics) + len(self._inflight)

    @property
    def backlog(self) -> int:
        """`pending` when delivery is failing or stalled (a failure burst, or the oldest
        undelivered metric older than `stall_s`), else 0: what the console line reports."""
        with self._lock:
            oldest = self._inflight[0] if self._inflight else (
                self._metrics[0] if self._metrics else None)
            if oldest is None:
                return 0
            late = time.time() * 1000 - oldest.timestamp > self.stall_s * 1000
            return len(self._metrics) + len(self._inflight) if (self._in_burst or late) else 0

    def flush(self, force: bool = True, timeout: Optional[float] = None) -> bool:
        """Deliver what is buffered. Never raises; returns True when nothing is left to send.

        Without `force`: the sender is woken, and delivers once the backoff after a failure has
        passed; this returns at once. With `force`: a delivery attempt is made now, regardless
        of the backoff, and waited for (up to `timeout` s, default `finish_timeout_s`, with the
        sender; without one it runs on this thread)."""
        if self.tracking_uri is None:
            with self._lock:
                return not self._has_pending()
        if not self.background:
            with self._lock:
                if not self._has_pending():
                    return True
            if not force and time.monotonic() < self._next_try:
                return False
            self._attempt()
            with self._lock:
                return not self._has_pending()
        with self._wake:
            if not self._has_pending():
                return True
            if not force:
                self._wake.notify_all()
                return False
            self._requested += 1
            mine = self._requested
            self._wake.notify_all()
            deadline = time.monotonic() + (self.finish_timeout_s if timeout is None else timeout)
            while self._served < mine and self._sender is not None and self._sender.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            return not self._has_pending()

    def last_logged_step(self, key: Optional[str] = None) -> Optional[int]:
        """Highest step in the store for `key` (from its full metric history), or over all keys
        (from the latest values) when `key` is None; None if nothing or the store is unreachable."""
        if self.client is None or self.run_id is None:
            return None
        try:
            if key is not None:
                steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
                return max(steps) if steps else None
            latest = self._store_latest_steps()
            return max(latest.values()) if latest else None
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: cannot read back metric history (%s)", e)
            return None

    def finish(self, status: str = "FINISHED") -> dict:
        """Last forced delivery, mark the run `status`, and report what could not be sent. Waits
        at most `finish_timeout_s` for the store; what is still undelivered then (including a
        request still hanging) goes to `<run_dir>/mlflow-unsent.jsonl`."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._finished:
            return self._report(status)
        with self._lock:
            self._terminal = status
        deadline = time.monotonic() + self.finish_timeout_s
        for attempt in range(max(1, self.finish_attempts)):
            if self.flush(force=True, timeout=max(0.0, deadline - time.monotonic())):
                break
            left = deadline - time.monotonic()
            if attempt + 1 < self.finish_attempts and left > 0:
                time.sleep(min(1.0, self.backoff_max_s, left))
        with self._wake:
            self._finished = True  # the sender stops (after a request still in progress)
            self._wake.notify_all()
            unsent = self._inflight + list(self._metrics)
            self._inflight = []
            self._metrics.clear()
            artifacts, self._artifacts = self._artifacts, []
        if unsent:
            dump = None
            if self.run_dir is not None:
                try:
                    dump = self.run_dir / "mlflow-unsent.jsonl"
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    with open(dump, "a") as f:
                        for m in unsent:
                            f.write(json.dumps({"key": m.key, "value": m.value, "step": m.step,
                                                "timestamp": m.timestamp}) + "\n")
                except OSError:
                    dump = None
            self.lost += len(unsent)
            log.warning("tracking: %d metrics could not be delivered to %s%s", len(unsent),
                        self.tracking_uri, f" (written to {dump})" if dump else "")
        if artifacts:
            self.lost_artifacts += len(artifacts)
            log.warning("tracking: artifacts not uploaded: %s", [a for a, _ in artifacts])
        return self._report(status)

    # ------------------------------------------------------------------ internals

    def _report(self, status: str) -> dict:
        return {"run_id": self.run_id, "status": status, "failures": self.failures,
                "sent_metrics": self.sent, "lost_metrics": self.lost,
                "lost_artifacts": self.lost_artifacts, "skipped": self.skipped,
                "terminated": self._terminal is None}

    def _has_pending(self) -> bool:  # with _lock held
        return bool(self._need_setup or self._params or self._tags or self._metrics
                    or self._inflight or self._artifacts or self._terminal)

    def _trim(self) -> None:  # with _lock held: the oldest metrics beyond buffer_size are lost
        while len(self._metrics) > self.buffer_size:
            self._metrics.popleft()
            self.lost += 1

    def _send_loop(self) -> None:
        """The sender thread: an attempt whenever one is forced, or something is pending and
        the backoff has passed; ends once `finish` has run."""
        while True:
            with self._wake:
                while True:
                    if self._finished:
                        self._wake.notify_all()
                        return
                    forced = self._served < self._requested
                    due = self._has_pending() and time.monotonic() >= self._next_try
                    if forced or due:
                        break
                    left = self._next_try - time.monotonic() if self._has_pending() else 1.0
                    self._wake.wait(min(max(left, 0.01), 1.0))
                requested = self._requested
            self._attempt()
            with self._wake:
                self._served = max(self._served, requested)
                self._attempts += 1
                self._wake.notify_all()

    def _attempt(self) -> None:
        """One delivery attempt, with the failure bookkeeping (never raises)."""
        try:
            self._deliver()
        except Exception as e:  # noqa: BLE001 - any store error must not reach the train loop
            self.failures += 1
            self._burst_failures += 1
            if not self._in_burst:
                self._in_burst = True
                log.warning("tracking: MLflow store %s unreachable (%s: %s); buffering metrics "
                            "and retrying with backoff", self.tracking_uri, type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else "")
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.backoff_max_s)
            return
        if self._in_burst:
            log.warning("tracking: MLflow store reachable again after %d failed attempts; "
                        "buffered data delivered", self._burst_failures)
        self._in_burst, self._burst_failures = False, 0
        self._backoff, self._next_try = self.backoff_initial_s, 0.0

    def _store_latest_steps(self) -> dict[str, int]:
        run = self.client.get_run(self.run_id)
        objs = getattr(run.data, "_metric_objs", None)
        if objs is not None:
            return {m.key: int(m.step) for m in objs}
        out = {}
        for key in run.data.metrics:
            hist = self.client.get_metric_history(self.run_id, key)
            if hist:
                out[key] = max(int(m.step) for m in hist)
        return out

    def _setup(self) -> None:
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        c = self.client
        if self._resume:
            run = c.get_run(self.run_id)
            c.update_run(self.run_id, status="RUNNING")
            # Per-key high-water marks from the store: re-logged steps are dropped, including
            # any buffered before the store could be reached.
            latest = self._store_latest_steps()
            existing = run.data.params
            with self._lock:
                for key, step in latest.items():
                    self._last_step[key] = max(self._last_step.get(key, step), step)
                kept = deque()
                for m in self._metrics:
                    if m.step <= latest.get(m.key, -(2**62)):
                        self.skipped += 1
                    else:
                        kept.append(m)
                self._metrics = kept
                params = []
                for p in self._params:
                    if p.key not in existing:
                        params.append(p)
                    elif existing[p.key] != p.value:
                        self._tags[f"megamor.param_changed.{p.key}"[:250]] = \
                            f"{existing[p.key]} -> {p.value}"[:TAG_VALUE_LIMIT]
                self._params = params
                self._tags.setdefault("megamor.resumed", "true")
        else:
            exp = c.get_experiment_by_name(self._experiment)
            if exp is None:
                art = None
                if self._default_store:
                    art = (self.run_dir.resolve() / "mlruns-artifacts").as_uri()
                try:
                    exp_id = c.create_experiment(self._experiment, artifact_location=art)
                except Exception:  # created concurrently: use it
                    exp = c.get_experiment_by_name(self._experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            tags = {"megamor.run_dir": str(self.run_dir.resolve())}
            run = c.create_run(exp_id, run_name=self._run_name, tags=tags)
            self.run_id = run.info.run_id
            self._resume = True  # a retry after this point must not create a second run
        with self._wake:
            self._need_setup = False
            self._wake.notify_all()  # `start` waits for the run to exist

    def _deliver(self) -> None:
        """Send everything buffered: params, tags, metrics, artifacts, then the terminal status.
        Items are taken from the buffers under the lock and sent without it; a failed request
        puts its items back (metrics at the front, in order). After `finish` nothing more is
        sent (what it wrote to the unsent file stays there)."""
        from mlflow.entities import RunTag

        if self._need_setup:
            self._setup()
        c, rid = self.client, self.run_id
        while True:
            with self._lock:
                chunk = self._params[:_PARAMS_PER_BATCH]
                if not chunk or self._finished:
                    break
            c.log_batch(rid, params=chunk, synchronous=True)
            with self._lock:
                del self._params[:len(chunk)]
        while True:
            with self._lock:
                tags = {k: self._tags[k] for k in list(self._tags)[:_TAGS_PER_BATCH]}
                if not tags or self._finished:
                    break
            c.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
            with self._lock:
                for k, v in tags.items():
                    if self._tags.get(k) == v:  # not set again meanwhile
                        del self._tags[k]
        while True:
            with self._lock:
                n = min(_METRICS_PER_BATCH, len(self._metrics))
                if n == 0 or self._finished:
                    break
                chunk = [self._metrics.popleft() for _ in range(n)]
                self._inflight = chunk
            try:
                c.log_batch(rid, metrics=chunk, synchronous=True)
            except BaseException:
                with self._lock:
                    if self._inflight is chunk:  # (else `finish` took them for the unsent file)
                        self._metrics.extendleft(reversed(chunk))
                        self._inflight = []
                        self._trim()
                raise
            with self._lock:
                if self._inflight is chunk:
                    self._inflight = []
                self.sent += len(chunk)
        while True:
            with self._lock:
                if not self._artifacts or self._finished:
                    break
                item = self._artifacts[0]
            path, artifact_path = item
            if Path(path).is_dir():
                c.log_artifacts(rid, path, artifact_path)
            else:
                c.log_artifact(rid, path, artifact_path)
            with self._lock:
                if self._artifacts and self._artifacts[0] is item:
                    self._artifacts.pop(0)
        with self._lock:
            terminal = self._terminal
            if terminal is None or self._has_pending_besides_terminal():
                return
        c.set_terminated(rid, status=terminal)
        with self._lock:
            if self._terminal == terminal:
                self._terminal = None

    def _has_pending_besides_terminal(self) -> bool:  # with _lock held
        return bool(self._need_setup or self._params or self._tags or self._metrics
                    or self._inflight or self._artifacts)


def create_tracker(enabled: bool, is_logging_rank: bool, **kwargs) -> Tracker | NullTracker:
    """A real `Tracker` on the logging rank when tracking is enabled, a `NullTracker` otherwise."""
    return Tracker(**kwargs) if (enabled and is_logging_rank) else NullTracker()
