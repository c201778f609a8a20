"""The one guard over torch.distributed, shared by the test suite and the GPU check: every tensor
megamor hands to a collective must be one an NCCL group accepts.

The rule, for a tensor handed to a tensor collective or point-to-point call:
- on a GPU machine (`install()` where CUDA is available): its device must be CUDA;
- on a CPU machine: it must not be *host-born*. Every tensor is on the CPU there, so the guard
  asks instead where the tensor would live on a GPU, by tracking where each tensor came from
  (a torch function mode over every torch call of the process, `Provenance`):
  - host-born: made without a `device=` argument (`torch.zeros(1)`, `torch.tensor([...])`,
    `torch.from_numpy`, ...), or moved with `.cpu()`: on a GPU machine these are CPU tensors;
  - device-born: made with an explicit `device=` (`self.device`, megatron's
    `torch.cuda.current_device()`), moved with `.to(device)` / `.cuda()`, or computed from a
    device-born tensor (a tensor from autograd or from C++ internals counts as device-born);
  - anything else follows its inputs: host-born if every tensor input is host-born.
  Known blind spot: an explicit CPU device (`device="cpu"`, `.to("cpu")`) counts as
  device-born: under the CPU shims megatron's CUDA device reads "cpu" too.

Not judged:
- calls on a group created with an explicit CPU backend (megatron's `*_GLOO` groups);
- object collectives and barriers (`all_gather_object`, `broadcast_object_list`, ...): they
  carry no caller tensor; torch picks their device from the group (gloo's CPU under megamor's
  `cpu:gloo,cuda:nccl` default group) and runs its own tensor collectives inside them, on CPU
  tensors there, correctly. Those inner calls are counted in `inner`, never judged: a guard that
  judged them (the GPU check's former `DeviceRule`) fails megatron's checkpoint save on its
  first `all_gather_object`.

The rule is stricter than "legal under megamor's own multi-backend default group" on purpose: a
launcher that initialises torch.distributed itself with plain NCCL (Megatron-LM's does) bypasses
`parallel.init_process_group`, and a CPU tensor would then crash the step.

Use: `install()` after `megamor.shims.install_cpu_shims()` on a CPU machine (so the provenance
mode sees `.cuda()` and `device="cuda"` before the shims rewrite them) and before any model is
built; megatron binds some collectives to its own module names at import, and those of megatron
modules already imported (the shims import its tensor_parallel) are re-pointed at their wrappers
(`_rebind_captured`). `probe()` shows on the live groups that the guard is looking; `report()`
returns what was seen.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

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
_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../megamor


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
    """Records every torch.distributed call and judges the tensors of the tensor collectives
    (module docstring). `device_type`: "cuda" judges real devices, "cpu" judges provenance."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.calls: Counter = Counter()  # "function @ megamor caller" -> count
        # "inner function in object function @ megamor caller" -> count: the tensor
        # collectives torch runs inside an object collective or barrier (not judged)
        self.inner: Counter = Counter()
        self.violations: list[str] = []
        self.cpu_groups: set[int] = set()  # ids of groups created with an explicit CPU backend
        self._outer: list[str] = []  # the object collectives being run (nesting)

    def _caller(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename.startswith(_PACKAGE):
                rel = Path(f.f_code.co_filename).relative_to(Path(_PACKAGE).parent)
                return f"{rel}:{f.f_code.co_name}"
            f = f.f_back
        return "outside megamor"

    def off_device(self, t: torch.Tensor) -> bool:
        """Would NCCL reject this tensor (module docstring)?"""
        if self.device_type == "cuda":
            return t.device.type != "cuda"
        return host_born(t)

    def judge(self, name: str, where: str, args, kwargs) -> None:
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if id(group) in self.cpu_groups:
            return
        for t in _tensors(list(args) + list(kwargs.values())):
            if self.off_device(t):
                what = ("a host tensor (made without device=, or moved with .cpu())"
                        if self.device_type == "cpu" else f"a {t.device} tensor")
                self.violations.append(f"{name} @ {where}: {what} {tuple(t.shape)} {t.dtype}; "
                                       f"NCCL rejects it")

    def wrap(self, name: str, fn):
        guard = self

        def wrapped(*args, **kwargs):
            if guard._outer:
                # Inside another wrapped call: torch's own work (an object collective's tensor
                # collectives; torch function modes dispatching the same call again).
                outer = guard._outer[-1]
                if outer.split(" @")[0] not in OBJECT_CALLS:
                    return fn(*args, **kwargs)
                guard.inner[f"{name} in {outer}"] += 1
                guard._outer.append(f"{name} (inner)")
                try:
                    return fn(*args, **kwargs)
                finally:
                    guard._outer.pop()
            where = guard._caller()
            guard.calls[f"{name} @ {where}"] += 1
            if name in TENSOR_CALLS:
                guard.judge(name, where, args, kwargs)
            guard._outer.append(f"{name} @ {where}")
            try:
                return fn(*args, **kwargs)
            finally:
                guard._outer.pop()

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

    def probe(self, group, device: torch.device) -> dict:
        """On a live group: a host tensor is flagged, a device tensor is not (what the guard saw
        is then forgotten). Shows that the guard is installed and looking."""
        before = len(self.violations)
        dist.all_reduce(torch.zeros(1), group=group)  # host-born; a CPU tensor on a GPU
        flagged = len(self.violations) - before
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        passed = len(self.violations) - before == flagged
        del self.violations[before:]
        self.calls.clear()
        self.inner.clear()
        return {"host_flagged": flagged, "device_passed": passed}

    def report(self) -> dict:
        return {"calls": dict(self.calls), "inner": dict(self.inner),
                "violations": list(self.violations)}


GUARD: Optional[Guard] = None


def install(provenance: Optional[bool] = None) -> Guard:
    """Wrap every torch.distributed collective of this process (once); `provenance`: judge
    where tensors come from (default: where no GPU is visible), else their real device."""
    global GUARD
    if GUARD is not None:
        return GUARD
    if provenance is None:
        provenance = not torch.cuda.is_available()
    GUARD = Guard("cpu" if provenance else "cuda")
    wrapped = {}
    for name in TENSOR_CALLS + OBJECT_CALLS:
        if hasattr(c10d, name):
            fn = getattr(c10d, name)
            w = GUARD.wrap(name, fn)
            wrapped[id(fn)] = w
            setattr(c10d, name, w)
            setattr(dist, name, w)
    _rebind_captured(wrapped)
    ng = GUARD.wrap_new_group(c10d.new_group)
    c10d.new_group = dist.new_group = ng
    if provenance:
        Provenance().__enter__()  # for the lifetime of the process
    return GUARD


def _rebind_captured(wrapped: dict) -> None:
    """megatron binds some collectives to module names at import (`dist_all_gather_func`,
    `dist_reduce_scatter_func`: its sequence-parallel mappings and the distributed optimizer's
    buckets); a megatron module imported before `install()` (megamor's CPU shims import
    megatron's tensor_parallel) keeps the unwrapped function. Point every such name of an
    imported megatron module at its wrapper, so those calls are recorded and judged too."""
    for modname, mod in list(sys.modules.items()):
        if mod is None or not modname.startswith("megatron"):
            continue
        for attr, value in list(vars(mod).items()):
            if callable(value) and id(value) in wrapped:
                setattr(mod, attr, wrapped[id(value)])
