"""A guard over torch.distributed that finds tensors an NCCL group could not take, on CPU/gloo.

On the CPU every tensor is on the training device, so "is this tensor on `dims.device`?" cannot
fail here. The guard asks instead where the tensor *would* live on a GPU, by tracking where each
tensor came from (a torch function mode over every torch call of the process):

- host-born: made without a `device=` argument (`torch.zeros(1)`, `torch.tensor([...])`,
  `torch.from_numpy`, ...), or moved with `.cpu()`: on a GPU machine these are CPU tensors;
- device-born: made with an explicit `device=` (`self.device`, megatron's
  `torch.cuda.current_device()`), moved with `.to(device)` / `.cuda()`, or computed from a
  device-born tensor (a tensor from autograd or from C++ internals counts as device-born);
- anything else follows its inputs: host-born if every tensor input is host-born.

Every collective and point-to-point call is wrapped; a host-born tensor handed to one is a
violation, unless the group was created with an explicit CPU backend (megatron's `*_GLOO`
groups). Object collectives and barriers carry no caller tensor (torch picks their device from
the group: gloo's CPU under megamor's `cpu:gloo,cuda:nccl` default group) and are only recorded.

The rule is stricter than "legal under megamor's own multi-backend default group" on purpose: a
launcher that initialises torch.distributed itself with plain NCCL (Megatron-LM's does) bypasses
`parallel.init_process_group`, and a CPU tensor would then crash the step.

Known blind spot: an explicit CPU device (`device="cpu"`, `.to("cpu")`) counts as device-born:
under the CPU shims megatron's CUDA device reads "cpu" too, so the two cannot be told apart.

Use: `install()` before megatron is imported (megatron captures some collectives at import),
after `megamor.shims.install_cpu_shims()` (so this mode sees `.cuda()` and `device="cuda"` before
the shims rewrite them); `report()` returns what was seen.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode

_HOST = "_megamor_host_born"
TENSOR_CALLS = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single",
    "broadcast", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced",
)
OBJECT_CALLS = (
    "barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
    "scatter_object_list", "send_object_list", "recv_object_list",
)
_PACKAGE = str(Path(__file__).resolve().parents[2] / "megamor")


def host_born(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


def _tensors(seq):
    for a in seq:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b
                elif isinstance(b, dist.P2POp):
                    yield b.tensor
        elif isinstance(a, dist.P2POp):
            yield a.tensor


def _to_device_arg(args, kwargs):
    """For Tensor.to: the target device if one is named, the tensor to follow if one is given."""
    if kwargs.get("device") is not None:
        return "device"
    for a in args[1:2]:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (torch.device, str, int)):
            return "device"
    return None


class Provenance(TorchFunctionMode):
    """Marks host-born tensors (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.cuda:
            host = False
        elif func is torch.Tensor.to:
            target = _to_device_arg(args, kwargs)
            host = host_born(target) if isinstance(target, torch.Tensor) else \
                (False if target == "device" else host_born(args[0]))
            if isinstance(out, torch.Tensor):  # a no-op move returns the same object
                setattr(out, _HOST, host)
            return out
        elif kwargs.get("device") is not None:
            host = False
        else:
            ins = list(_tensors(args)) + list(_tensors(kwargs.values()))
            if not ins:
                host = True
            else:
                host = all(host_born(t) for t in ins)
            ids = {id(t) for t in ins}
            if isinstance(out, torch.Tensor) and id(out) in ids:
                return out  # in place / self: keeps its own provenance
        if host:
            for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
                setattr(t, _HOST, True)
        return out


class Guard:
    def __init__(self):
        self.calls: Counter = Counter()  # "function @ megamor caller" -> count
        self.violations: list[str] = []
        self.cpu_groups: set[int] = set()  # ids of groups created with an explicit CPU backend
        self._depth = 0  # object collectives call tensor collectives inside torch: skip those

    def _caller(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename.startswith(_PACKAGE):
                rel = Path(f.f_code.co_filename).relative_to(Path(_PACKAGE).parent)
                return f"{rel}:{f.f_code.co_name}"
            f = f.f_back
        return "outside megamor"

    def wrap(self, name: str, fn):
        guard = self

        def wrapped(*args, **kwargs):
            if guard._depth:
                return fn(*args, **kwargs)
            where = guard._caller()
            guard.calls[f"{name} @ {where}"] += 1
            if name in TENSOR_CALLS:
                group = kwargs.get("group")
                if group is None:
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                if id(group) not in guard.cpu_groups:
                    for t in _tensors(list(args) + list(kwargs.values())):
                        if host_born(t):
                            guard.violations.append(
                                f"{name} @ {where}: a host tensor {tuple(t.shape)} {t.dtype} "
                                f"(made without device=, or moved with .cpu()); NCCL rejects it")
            guard._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                guard._depth -= 1

        wrapped.__wrapped__ = fn
        return wrapped

    def wrap_new_group(self, fn):
        guard = self

        def new_group(*args, **kwargs):
            group = fn(*args, **kwargs)
            backend = kwargs.get("backend")
            if backend is not None and str(backend).lower() == "gloo":
                guard.cpu_groups.add(id(group))
            return group

        return new_group

    def report(self) -> dict:
        return {"calls": dict(self.calls), "violations": self.violations}


GUARD = Guard()


def install() -> Guard:
    for name in TENSOR_CALLS + OBJECT_CALLS:
        if hasattr(c10d, name):
            w = GUARD.wrap(name, getattr(c10d, name))
            setattr(c10d, name, w)
            setattr(dist, name, w)
    ng = GUARD.wrap_new_group(c10d.new_group)
    c10d.new_group = dist.new_group = ng
    Provenance().__enter__()  # for the lifetime of the process
    return GUARD
