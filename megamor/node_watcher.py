"""The node's hang watcher (docs/cluster.md, "When a rank stalls"): a process outside every rank
that reads the node's progress records (megamor/progress.py), publishes them for the other
nodes, judges them (megamor/watchdog.py) and, on a stall, writes the ranks' stacks, prints one
line, writes `<run>/hung.json` and kills the node's ranks (the job exits EXIT_HUNG).

Two launchers: `megamor pretrain --nproc N` is itself the watcher of its ranks (`local_watcher`,
polled by megamor/launch/local.py); under Slurm or torchrun the node's first task starts
`python -m megamor.node_watcher` (`start_node_watcher`, from megamor/launch/slurm.py).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from megamor.progress import PROGRESS_DIR_ENV, STACK_SIGNAL, default_base, read_records, stacks_path
from megamor.watchdog import (AUTO_FLOOR_S, EXIT_HUNG, FROZEN_STATES, HUNG_MARKER, POLL_S,
                              Timeouts, Verdict, judge, parse_hang, timeouts, verdict_line,
                              where)


# ----------------------------------------------------------------------------- the watcher


def _process(rec: Mapping):
    """The live psutil.Process of a record (pid and start time match), else None."""
    import psutil
    try:
        p = psutil.Process(int(rec["pid"]))
        if rec.get("start") and abs(p.create_time() - float(rec["start"])) > 1.0:
            return None
        return p
    except (psutil.Error, ValueError, KeyError):
        return None


def _state(rec: Mapping) -> str:
    import psutil
    p = _process(rec)
    if p is None:
        return "exited"
    try:
        return p.status()
    except psutil.Error:
        return "exited"


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        return "?"


class NodeWatcher:
    """Watches the ranks of one node (all of them under `megamor pretrain --nproc N`)."""

    def __init__(self, progress_dir: Path, output_dir: Path, t: Timeouts, world_size: int,
                 local_ranks: int, node: int = 0, launch: str = "", tag: str = "",
                 checkpoint_dir: Optional[Path] = None, out=None):
        self.progress_dir, self.output_dir = Path(progress_dir), Path(output_dir)
        self.t, self.world_size, self.local_ranks, self.node = t, world_size, local_ranks, node
        self.launch = launch or f"local-{os.getpid()}-{time.time():.0f}"
        self.tag = tag or time.strftime("%Y%m%d-%H%M%S")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir \
            else self.output_dir / "checkpoints"
        self.out = out
        self.shared = self.output_dir / "logs" / "progress"
        self.publish_s = min(5.0, max(1.0, (t.hang or AUTO_FLOOR_S) / 4))
        self.multi_node = world_size > local_ranks
        self.stacks_dir = self.output_dir / "logs" / f"hang-{self.tag}"
        self._last_poll = self._last_publish = 0.0
        self.local: dict[int, dict] = {}
        self.seen_local = False
        self.owns_dir = False  # remove the progress directory at the end
        self.broken = False

    # --- reading and publishing

    def read_local(self) -> dict[int, dict]:
        recs = read_records(self.progress_dir)
        for rec in recs.values():
            rec["state"] = _state(rec)
        if recs:
            self.seen_local = True
        self.local = recs
        return recs

    def publish(self, now: float, dumped: bool = False) -> None:
        doc = {"launch": self.launch, "node": self.node, "published": now,
               "watcher_pid": os.getpid(), "dumped": dumped,
               "ranks": [self.local[r] for r in sorted(self.local)]}
        try:
            self.shared.mkdir(parents=True, exist_ok=True)
            path = self.shared / f"node_{self.node}.json"
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError:
            pass  # the shared directory may be briefly unavailable; publish again next time
        self._last_publish = now

    def read_nodes(self, now: float) -> dict[int, dict]:
        """Other nodes' published documents of this launch: node -> doc (with `stale`)."""
        out = {}
        for p in self.shared.glob("node_*.json"):
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("launch") != self.launch or doc.get("node") == self.node:
                continue
            doc["stale"] = now - float(doc.get("published", 0)) > 3 * self.publish_s + 10
            out[int(doc["node"])] = doc
        return out

    def all_records(self, now: float) -> dict[int, dict]:
        recs = {r: dict(rec) for r, rec in self.local.items()}
        if self.multi_node:
            for doc in self.read_nodes(now).values():
                for rec in doc.get("ranks", []):
                    recs.setdefault(int(rec["rank"]), dict(rec, stale=doc["stale"]))
        return recs

    def poll(self, now: Optional[float] = None, force: bool = False) -> Optional[Verdict]:
        """Read, publish when due, judge; at most once per POLL_S unless forced. A failure of
        the watcher itself is reported once and never ends the job it watches."""
        now = time.time() if now is None else now
        if self.broken or (not force and now - self._last_poll < POLL_S):
            return None
        self._last_poll = now
        try:
            return self._poll(now)
        except Exception as e:  # noqa: BLE001 - the watcher must not end a healthy job
            self.broken = True
            print(f"WARNING: hang watchdog stopped watching node {self.node}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None

    def _poll(self, now: float) -> Optional[Verdict]:
        self.read_local()
        if now - self._last_publish >= self.publish_s:
            self.publish(now)
        if not self.t.enabled or not self.local:
            return None
        slack = self.publish_s + 2.0 if self.multi_node else 0.0
        return judge(self.all_records(now), self.world_size, self.t, now, slack)

    def local_ranks_gone(self) -> bool:
        return self.seen_local and all(_process(rec) is None for rec in self.local.values())

    # --- ending the job

    def dump_stacks(self, wait_s: float = 15.0, settle_s: float = 1.0) -> list[Path]:
        """Every local rank's Python stacks into `stacks_dir/rank_<R>.txt`: each rank's dump is
        copied once its file has grown and then not changed for `settle_s` (a busy node may
        take a while to run the handler of every rank), at most `wait_s` after the signal."""
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        pending = {}
        written = []
        for r, rec in sorted(self.local.items()):
            src = stacks_path(self.progress_dir, r)
            before = src.stat().st_size if src.exists() else 0
            p = _process(rec)
            state = rec["state"] = _state(rec)  # now, not at the last poll
            dest = self.stacks_dir / f"rank_{r}.txt"
            with open(dest, "w") as f:
                f.write(f"rank {r} (pid {rec.get('pid')} on {rec.get('host')}, node {self.node}): "
                        f"{where(rec)} for {now - float(rec['t']):.1f} s; process state "
                        f"{state}; kernel wait channel {_wchan(int(rec.get('pid', 0)))}\n")
                if p is not None and state not in ("stopped", "tracing-stop", "zombie"):
                    try:
                        os.kill(p.pid, STACK_SIGNAL)
                        pending[r] = (src, before, dest)
                    except OSError as e:
                        f.write(f"(could not signal it: {e})\n")
                elif p is not None:
                    f.write(f"(the process is {FROZEN_STATES.get(state, state)}: it cannot write "
                            f"its Python stack until it runs again)\n")
            written.append(dest)
        deadline = time.time() + wait_s
        sizes: dict[int, tuple[int, float]] = {}  # rank -> (size, since when)
        while pending and time.time() < deadline:
            time.sleep(0.1)
            for r, (src, before, dest) in list(pending.items()):
                size = src.stat().st_size if src.exists() else 0
                if size != sizes.get(r, (None, 0))[0]:
                    sizes[r] = (size, time.time())
                elif size > before and time.time() - sizes[r][1] >= settle_s:
                    self._copy_dump(src, before, dest)
                    del pending[r]
        for r, (src, before, dest) in pending.items():
            self._copy_dump(src, before, dest, note="(no complete stack within "
                                                    f"{wait_s:g} s of the signal)\n")
        py_spy = shutil.which("py-spy")
        if py_spy:
            for r, rec in sorted(self.local.items()):
                if _process(rec) is None:
                    continue
                try:
                    res = subprocess.run([py_spy, "dump", "--pid", str(rec["pid"]), "--nonblocking"],
                                         capture_output=True, text=True, timeout=20)
                    text = res.stdout + res.stderr
                except (OSError, subprocess.SubprocessError) as e:
                    text = f"{type(e).__name__}: {e}\n"
                with open(self.stacks_dir / f"rank_{r}.txt", "a") as f:
                    f.write("\n--- py-spy dump --nonblocking\n" + text)
        return written

    @staticmethod
    def _copy_dump(src: Path, offset: int, dest: Path, note: str = "") -> None:
        try:
            with open(src, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        with open(dest, "a") as f:
            f.write(note + text)

    def _claim(self) -> bool:
        """One watcher of the launch prints the line and writes the marker."""
        if not self.multi_node:
            return True
        key = hashlib.sha1(self.launch.encode()).hexdigest()[:12]
        try:
            self.shared.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.shared / f".verdict-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
        except OSError:
            return self.node == 0

    def _wait_for_nodes(self, grace_s: float) -> None:
        """Until every node's watcher has dumped its stacks (a silent node is not waited for),
        at most `grace_s`."""
        deadline = time.time() + grace_s
        while time.time() < deadline:
            docs = self.read_nodes(time.time())
            ranks = set(self.local) | {int(x["rank"]) for d in docs.values()
                                       for x in d.get("ranks", [])}
            if len(ranks) >= self.world_size and all(d.get("dumped") or d["stale"]
                                                     for d in docs.values()):
                return
            time.sleep(0.5)

    def end_job(self, v: Verdict, kill: Callable[[], None], grace_s: float = 20.0) -> str:
        """Stacks, the line and the marker (one watcher), then `kill` this node's ranks."""
        self.dump_stacks()
        now = time.time()
        self.publish(now, dumped=True)
        line = verdict_line(v, self.stacks_dir)
        marker = self.output_dir / HUNG_MARKER
        if self.multi_node:
            self._wait_for_nodes(grace_s)
            v = judge(self.all_records(time.time()), self.world_size, self.t, time.time(), 0) or v
            line = verdict_line(v, self.stacks_dir)
        if self._claim():
            doc = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                   "stalled_s": round(v.stalled_s, 1), "limit_s": v.limit_s,
                   "laggards": [r["rank"] for r in v.laggards], "missing": v.missing,
                   "where": {str(r["rank"]): {"step": r["step"], "phase": r["phase"],
                                              "state": r.get("state")}
                             for r in v.laggards + v.waiting},
                   "stacks": str(self.stacks_dir), "checkpoint": self._latest(),
                   "launch": self.launch, "line": line}
            try:
                logs = self.output_dir / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                with open(logs / "hangs.jsonl", "a") as f:
                    f.write(json.dumps(doc) + "\n")
                tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
                tmp.write_text(json.dumps(doc, indent=1))
                os.replace(tmp, marker)
            except OSError as e:
                line += f" (could not write {marker}: {e})"
            print(line, file=self.out or sys.stderr, flush=True)
        elif self.multi_node:
            deadline = time.time() + grace_s
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.5)
        kill()
        return line

    def _latest(self) -> Optional[str]:
        try:
            return str(self.checkpoint_dir / (self.checkpoint_dir / "latest").read_text().strip())
        except OSError:
            return None

    def close(self, remove_dir: bool) -> None:
        if remove_dir:
            shutil.rmtree(self.progress_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- launchers


def local_watcher(cfg, nproc: int) -> Optional[NodeWatcher]:
    """The watcher of `megamor pretrain --nproc N` (None when run.hang_timeout=0). Its progress
    directory is MEGAMOR_PROGRESS_DIR if set, else a fresh one under /dev/shm."""
    t = timeouts(cfg)
    if not t.enabled:
        return None
    from megamor.preflight import checkpoint_root
    given = os.environ.get(PROGRESS_DIR_ENV)
    if given:
        d = Path(given)
    else:
        import tempfile

        import psutil
        base = default_base()
        for old in base.glob("megamor-progress-*-*"):  # of launchers killed with -9
            pid = old.name.split("-")[2]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        d = Path(tempfile.mkdtemp(prefix=f"megamor-progress-{os.getpid()}-", dir=base))
    w = NodeWatcher(d, Path(cfg.run.output_dir), t, nproc, nproc,
                    checkpoint_dir=checkpoint_root(cfg))
    w.owns_dir = not given
    return w


def node_progress_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The progress directory every task of this node derives alike (MEGAMOR_PROGRESS_DIR, else
    under /dev/shm, named after the launch and the node)."""
    if env.get(PROGRESS_DIR_ENV):
        return Path(env[PROGRESS_DIR_ENV])
    from megamor.errors import launch_id
    key = hashlib.sha1(launch_id(env).encode()).hexdigest()[:12]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return default_base() / f"megamor-{uid}-{key}-n{_node(env)}"


def _node(env: Mapping[str, str]) -> str:
    """This node's index: NODE_RANK (launch/slurm.py), GROUP_RANK (torchrun)."""
    return env.get("NODE_RANK") or env.get("GROUP_RANK") or "0"


def launch_tag(env: Mapping[str, str] = os.environ) -> str:
    """A readable name for this launch's stacks directory."""
    if env.get("SLURM_JOB_ID"):
        return f"job{env['SLURM_JOB_ID']}-r{env.get('SLURM_RESTART_COUNT', '0')}"
    return time.strftime("%Y%m%d-%H%M%S")


def start_node_watcher(cfg, env: Mapping[str, str] = os.environ) -> Optional[subprocess.Popen]:
    """In a task launched by Slurm or torchrun (launch/slurm.py), before training: set this
    task's progress directory; on the node's first task (LOCAL_RANK 0) start the node's watcher
    process. It ignores the stop signals (Slurm signals every process of a step), dies with the
    task that started it, and ends when the node's ranks have exited."""
    t = timeouts(cfg)
    d = node_progress_dir(env)
    os.environ[PROGRESS_DIR_ENV] = str(d)
    if not t.enabled or env.get("LOCAL_RANK", "0") != "0":
        return None
    from megamor.errors import launch_id
    from megamor.lifecycle import STOP_SIGNALS, parent_death_signal_setter
    from megamor.preflight import checkpoint_root
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE") or world)
    cmd = [sys.executable, "-m", "megamor.node_watcher", "--progress-dir", str(d),
           "--output-dir", str(cfg.run.output_dir), "--checkpoint-dir", str(checkpoint_root(cfg)),
           "--hang-timeout", "auto" if t.hang is None else f"{t.hang:g}",
           "--world-size", str(world), "--local-ranks", str(local),
           "--node", _node(env), "--launch", launch_id(env),
           "--tag", launch_tag(env)]
    # SIGHUP, not SIGKILL, when the task ends: the watcher removes its directory and exits.
    die_with_task = parent_death_signal_setter(signal.SIGHUP)

    def shielded():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # inherited through exec
        die_with_task()

    return subprocess.Popen(cmd, preexec_fn=shielded, stdin=subprocess.DEVNULL)


def _kill_ranks(records: Iterable[Mapping]) -> None:
    """SIGKILL each rank and its helper processes (not this watcher); the rank that started this
    watcher last (its death ends the watcher too)."""
    import psutil
    me, parent = os.getpid(), os.getppid()
    procs = [p for p in (_process(r) for r in records) if p is not None]
    procs.sort(key=lambda p: p.pid == parent)
    for p in procs:
        try:
            victims = [c for c in p.children(recursive=True) if c.pid != me] + [p]
        except psutil.Error:
            victims = [p]
        for v in victims:
            try:
                v.kill()
            except psutil.Error:
                pass


def main(argv=None) -> int:
    """The per-node watcher of a Slurm (or torchrun) launch; started by `start_node_watcher`."""
    ap = argparse.ArgumentParser(prog="python -m megamor.node_watcher", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--progress-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--hang-timeout", default="auto")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--local-ranks", type=int, required=True)
    ap.add_argument("--node", type=int, default=0)
    ap.add_argument("--launch", default="")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    parent = os.getppid()

    def task_ended(signum, frame):
        raise SystemExit(0)  # through `finally`: the node-local directory is removed

    signal.signal(signal.SIGHUP, task_ended)
    w = NodeWatcher(Path(a.progress_dir), Path(a.output_dir), Timeouts(parse_hang(a.hang_timeout)),
                    a.world_size, a.local_ranks, a.node, a.launch, a.tag,
                    Path(a.checkpoint_dir) if a.checkpoint_dir else None, out=sys.stdout)
    try:
        while os.getppid() == parent:
            time.sleep(POLL_S)
            v = w.poll()
            if v is not None:
                def kill():
                    w.close(remove_dir=True)  # first: killing the last rank ends this process
                    _kill_ranks(w.local.values())
                w.end_job(v, kill=kill)
                return EXIT_HUNG
            if w.local_ranks_gone():
                break
    finally:
        # Done watching: a SIGHUP from here on (srun ending the step while this process exits)
        # must not raise SystemExit into interpreter shutdown (a traceback in the job log).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        w.close(remove_dir=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
