"""Turn a Slurm (or torchrun) environment into ranks and run `megamor pretrain` in this process
(`megamor.pretrain.run`, the function the CLI's `pretrain` runs).

    python -m megamor.launch.slurm [--nproc N] -- pretrain [--config F] [--resume auto] [overrides]
    python -m megamor.launch.slurm --check --world-size N -- pretrain ...  (batch step: preflight)
    megamor launch ...                                              (the same, as a subcommand)

Three situations, one entry point:

- inside an `srun` task (SLURM_PROCID set, no RANK): RANK / WORLD_SIZE / LOCAL_RANK /
  LOCAL_WORLD_SIZE / NODE_RANK come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
  SLURM_NODEID, MASTER_ADDR is the first host of the step's node list (expanded with
  `scontrol show hostnames`, else by `expand_nodelist`) resolved with getaddrinfo, MASTER_PORT is
  MEGAMOR_MASTER_PORT or derived from the job id; then `megamor pretrain` runs in-process and
  the trainer's env:// initialisation picks the variables up;
- under torchrun (RANK and WORLD_SIZE already set): run in-process as is;
- neither: `megamor pretrain --nproc N` on this machine (torchrun re-exec, gloo on CPU).

Every check that can fail (config, layout against the world size, node list, address) runs before
torch.distributed starts, and fails with one line `megamor launch: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Mapping, Optional

EXIT_USAGE = 2
DEFAULT_PORT_BASE = 29500


class LaunchError(RuntimeError):
    """A launch that cannot work; the message says what and how to fix it."""


# ----------------------------------------------------------------------------- node lists


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"node list {s!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def _expand_range(spec: str, where: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(f"node list {where!r}: cannot read range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"node list {where!r}: range {item!r} goes backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: `gpu[01-03,07],login-a,r[1-2]n[1-2]` -> hosts."""
    hosts: list[str] = []
    for part in _split_top(nodelist):
        m = re.search(r"\[([^\[\]]*)\]", part)
        if not m:
            if "[" in part or "]" in part:
                raise LaunchError(f"node list {nodelist!r}: cannot read {part!r}")
            hosts.append(part)
            continue
        head, tail = part[:m.start()], part[m.end():]
        for value in _expand_range(m.group(1), nodelist):
            hosts += expand_nodelist(head + value + tail)  # further brackets in the tail
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` when Slurm's tools are here, else `expand_nodelist`."""
    if shutil.which("scontrol") and os.environ.get("MEGAMOR_NODELIST_PARSER") != "builtin":
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise LaunchError(f"node list {nodelist!r} names no host")
    return hosts


def resolve(host: str) -> str:
    """The address ranks use to reach `host` (IPv4 preferred); a clear error if it has none."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(
            f"cannot resolve the rendezvous host {host!r} (first host of the node list): {e}; "
            f"check DNS or /etc/hosts on the nodes, or set MASTER_ADDR") from None
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    return (v4 or [infos[0][4][0]])[0]


# ----------------------------------------------------------------------------- rank variables


def default_port(env: Mapping[str, str]) -> int:
    """MEGAMOR_MASTER_PORT, else a port derived from the job id (two jobs sharing a node, or a
    requeued job whose old port lingers in TIME_WAIT, do not collide)."""
    if env.get("MEGAMOR_MASTER_PORT"):
        return int(env["MEGAMOR_MASTER_PORT"])
    job = env.get("SLURM_JOB_ID", "")
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if job.isdigit():
        return 20000 + (int(job) * 7 + restart) % 20000
    return DEFAULT_PORT_BASE


def rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this process, from Slurm's (or torchrun's) env."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or set by hand
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                   "MASTER_PORT") if k in env}
        out.setdefault("LOCAL_RANK", "0")
        if int(out["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in out:
            raise LaunchError("RANK/WORLD_SIZE are set but MASTER_ADDR is not")
        return out
    if "SLURM_PROCID" not in env:
        raise LaunchError("neither Slurm (SLURM_PROCID) nor torchrun (RANK, WORLD_SIZE) "
                          "variables are set; use --nproc N to start ranks on this machine")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
        or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        if not nodelist:
            raise LaunchError("SLURM_JOB_NODELIST is not set: cannot find the rendezvous host")
        addr = resolve(hostnames(nodelist)[0])
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if not ntasks:
        raise LaunchError("SLURM_NTASKS is not set (run through srun, or sbatch --ntasks)")
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": ntasks,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(env.get("MASTER_PORT") or default_port(env)),
    }
    tpn = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    m = re.match(r"(\d+)", tpn)
    if m:
        out["LOCAL_WORLD_SIZE"] = m.group(1)
    return out


# ----------------------------------------------------------------------------- preflight


def _split_pretrain(argv: list[str]) -> list[str]:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise LaunchError("nothing to run: pass `-- pretrain [options] [overrides]`")
    if argv[0] != "pretrain":
        raise LaunchError(f"only `pretrain` can be launched, got {argv[0]!r}")
    return argv


def parse_pretrain(pretrain_argv: list[str]) -> argparse.Namespace:
    """`pretrain [--config F] [--resume R] [--nproc N] [overrides]` as `megamor pretrain` reads
    it: config, resume, nproc (None unless given) and overrides."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    ap.add_argument("--resume")
    ap.add_argument("--nproc", type=int)
    known, rest = ap.parse_known_args(pretrain_argv[1:])
    stray = [a for a in rest if "=" not in a]
    if stray:
        raise LaunchError(f"pretrain: unrecognized arguments: {' '.join(stray)}")
    known.overrides = rest
    return known


def check_config(pretrain_argv: list[str], world_size: int):
    """Load and validate the config exactly as `megamor pretrain` will, for this world size;
    returns it."""
    known = parse_pretrain(pretrain_argv)
    from megamor.config import ConfigError, load_config
    if known.config and not os.path.isfile(known.config):
        raise LaunchError(f"config file {known.config} does not exist")
    resume = [f"checkpoint.resume={known.resume}"] if known.resume else []
    try:
        cfg = load_config(known.config, known.overrides + resume)
        cfg.validate(world_size=world_size)
    except ConfigError as e:
        raise LaunchError(f"config error (world size {world_size}): {e}") from None
    return cfg


def data_named(pretrain_argv: list[str]) -> bool:
    """Whether the pretrain arguments name the training data: a `data.path=` override, or a
    `data: {path: ...}` entry in the --config file."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    known, rest = ap.parse_known_args(pretrain_argv[1:])
    if any(a.startswith("data.path=") for a in rest):
        return True
    if known.config and os.path.isfile(known.config):
        import yaml
        try:
            data = (yaml.safe_load(open(known.config)) or {}).get("data") or {}
        except (yaml.YAMLError, AttributeError):
            return False  # check_config reports the file
        return isinstance(data, dict) and "path" in data
    return False


def check_data_named(pretrain_argv: list[str]) -> None:
    """The GPU scripts refuse to train on the built-in demo corpus unless asked to by name."""
    if not data_named(pretrain_argv):
        raise LaunchError(
            "no training data named: this GPU job would train on the built-in demo corpus "
            "(CPython's documentation, 150k tokens); name yours on the sbatch line "
            "(data.path=/path/to/prepared) or as data.path in MEGAMOR_CONFIG, or pass "
            "data.path=builtin for a smoke run")


def check_network(cfg, hosts: list[str], env: Mapping[str, str]) -> None:
    """Print the addresses gloo and NCCL will use on this node; refuse a multi-node job whose
    gloo side would bind to loopback."""
    from megamor.launch import network
    try:
        print(f"megamor launch: network on {socket.gethostname()}: "
              f"{network.describe(env, cfg.train.device != 'cpu')}", flush=True)
        why = network.problem(env, len(hosts))
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if why:
        raise LaunchError(why)


def check_inputs(cfg, world_size: int) -> None:
    """`megamor pretrain`'s own checks before any rank starts (megamor/preflight.py): output
    directories, data and tokenizer, the checkpoint to resume and its schedule."""
    from megamor.errors import error_kind, input_errors
    from megamor.preflight import check_before_start
    try:
        for warning in check_before_start(cfg, world_size):
            print(f"megamor launch: warning: {warning}", file=sys.stderr, flush=True)
    except input_errors() as e:
        raise LaunchError(f"{error_kind(e)} error: {e}") from None


def allocation_world_size(env: Mapping[str, str]) -> Optional[int]:
    """Ranks the batch step will start: MEGAMOR_WORLD_SIZE, else SLURM_NTASKS, else nodes x
    tasks per node."""
    for k in ("MEGAMOR_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NPROCS"):
        if env.get(k):
            return int(env[k])
    nodes, tpn = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"), \
        env.get("SLURM_NTASKS_PER_NODE")
    if nodes and tpn and tpn.isdigit():
        return int(nodes) * int(tpn)
    return None


# ----------------------------------------------------------------------------- main


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m megamor.launch.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=None,
                   help="outside Slurm and torchrun: local ranks to start (default 1)")
    p.add_argument("--check", action="store_true",
                   help="preflight only: node list, rendezvous address and config for "
                        "--world-size; start nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --check: the ranks the job will have (default: from Slurm)")
    p.add_argument("--require-data", action="store_true",
                   help="with --check: refuse unless the arguments name data.path (the Slurm "
                        "scripts on GPU allocations)")
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="-- pretrain [--config F] [--resume auto] [overrides]")
    return p


def run(args) -> int:
    try:
        pretrain = _split_pretrain(list(args.rest))
        env = os.environ
        if args.check:
            world = args.world_size or allocation_world_size(env)
            if world is None:
                raise LaunchError("--check needs --world-size N outside a Slurm allocation")
            hosts = [socket.gethostname()]
            if env.get("SLURM_JOB_NODELIST"):
                hosts = hostnames(env["SLURM_JOB_NODELIST"])
            if "MASTER_ADDR" not in env and (env.get("SLURM_JOB_NODELIST")):
                addr = resolve(hosts[0])
                print(f"megamor launch: {len(hosts)} node(s), rendezvous {hosts[0]} ({addr}):"
                      f"{default_port(env)}, world size {world}", flush=True)
            if args.require_data:
                check_data_named(pretrain)
            cfg = check_config(pretrain, world)
            check_network(cfg, hosts, env)
            check_inputs(cfg, world)
            print("megamor launch: preflight ok", flush=True)
            return 0
        in_slurm_step = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env
        if ("RANK" in env and "WORLD_SIZE" in env) or in_slurm_step:
            ranks = rank_env(env)
            cfg = check_config(pretrain, int(ranks["WORLD_SIZE"]))
            os.environ.update(ranks)
            from megamor.launch import network
            try:
                where = network.describe(os.environ, cfg.train.device != "cpu")
            except ValueError as e:
                raise LaunchError(str(e)) from None
            gloo_ifname = network.gloo_default(os.environ)
            if gloo_ifname:  # gloo on the network NCCL_SOCKET_IFNAME names
                os.environ["GLOO_SOCKET_IFNAME"] = gloo_ifname
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"megamor launch: node {os.environ.get('NODE_RANK', '0')} "
                      f"({socket.gethostname()}): {where}", flush=True)
            from megamor.node_watcher import start_node_watcher
            start_node_watcher(cfg)  # the node's hang watchdog (first task of each node)
            if "SLURM_CPUS_PER_TASK" in env:
                os.environ.setdefault("OMP_NUM_THREADS", env["SLURM_CPUS_PER_TASK"])
            if ranks["RANK"] == "0":
                print(f"megamor launch: rank 0 of {ranks['WORLD_SIZE']}, rendezvous "
                      f"{ranks.get('MASTER_ADDR')}:{ranks.get('MASTER_PORT')}", flush=True)
        else:
            nproc = args.nproc or 1
            check_config(pretrain, nproc)
        known = parse_pretrain(pretrain)
    except LaunchError as e:
        print(f"megamor launch: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    from megamor.pretrain import run as run_pretrain
    nproc = known.nproc or args.nproc or 1  # --nproc of the pretrain arguments wins
    return run_pretrain(known.config, known.overrides, nproc=nproc, resume=known.resume)


def add_parsers(subparsers) -> None:
    """`megamor launch ...` (the same as `python -m megamor.launch.slurm ...`)."""
    p = subparsers.add_parser("launch", help="run pretrain from Slurm / torchrun variables "
                                             "(one process per srun task)")
    build_parser(p)
    p.set_defaults(fn=run)


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
