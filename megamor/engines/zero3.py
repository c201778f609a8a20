"""ZeRO-3 and the shared recursion block (docs/engines.md): `SharedBlockResidency` holds the
block gathered over the whole recursion loop instead of gathering it at every use, and two meters
count the bytes DeepSpeed all-gathers (for the `zero3/*` metrics, tests and benchmarks)."""

from __future__ import annotations

import torch


_HELD = -1  # a sub-module id no DeepSpeed module has: a held parameter is never released


class _OnBackward(torch.autograd.Function):
    """Identity whose backward calls `fn` first (before the gradient flows on)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


class SharedBlockResidency:
    """ZeRO-3: the shared recursion block's parameters gathered once per forward and once per
    backward, not at every use.

    DeepSpeed gathers a module's partitioned parameters before each call and releases them
    after; a block looped N_r times is gathered N_r times in the forward and N_r times again in
    the backward. `enter` (before the first recursion step) gathers the block with one coalesced
    all-gather and holds it; `exit` (after the last step) releases it. Their autograd twins do
    the same in reverse: the backward reaches `exit` first (gather, hold) and `enter` last
    (release). While held, every parameter carries a sub-module id no module has, so DeepSpeed's
    own release after each layer call leaves it gathered."""

    def __init__(self, params: list):
        # Parameters DeepSpeed keeps gathered anyway (below stage3_param_persistence_threshold)
        # are left to it.
        self.params = [p for p in params if not p.ds_persist]
        self.gathers = 0  # coalesced all-gathers issued (for tests and benchmarks)

    def hold(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        need = [p for p in self.params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if need:
            need[0].all_gather(param_list=need)
            self.gathers += 1
        for p in self.params:
            p.ds_active_sub_modules.add(_HELD)

    def release(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        for p in self.params:
            p.ds_active_sub_modules.discard(_HELD)
        free = [p for p in self.params
                if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
        if free:
            free[0].partition(param_list=free)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        self.hold()
        return _OnBackward.apply(x, self.release) if x.requires_grad else x

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        self.release()
        return _OnBackward.apply(x, self.hold) if x.requires_grad else x


class AllGatherMeter:
    """Bytes DeepSpeed all-gathers (ZeRO-3 parameter fetches), counted at deepspeed.comm's two
    all-gather entry points; `take()` returns the count since the last take. The wrappers are
    installed once per process (a later trainer in the same process reuses them)."""

    _bytes = 0
    _installed = False

    def __init__(self):
        cls = type(self)
        if not cls._installed:
            import deepspeed.comm as dcomm
            for name in ("allgather_fn", "all_gather_into_tensor"):
                setattr(dcomm, name, cls._counting(getattr(dcomm, name)))
            cls._installed = True
        self.take()

    @classmethod
    def _counting(cls, fn):
        def wrapper(*args, **kwargs):
            out = args[0] if args else kwargs.get("output_tensor")
            if out is not None:
                cls._bytes += out.numel() * out.element_size()
            return fn(*args, **kwargs)
        return wrapper

    @classmethod
    def take(cls) -> int:
        n, cls._bytes = cls._bytes, 0
        return n


class ParamGatherMeter:
    """Bytes of the given ZeRO-3 parameters gathered (their full size, each time a gather
    includes them), whichever path gathers them: DeepSpeed's module fetches
    (`all_gather_coalesced`) or a `SharedBlockResidency` (`all_gather`). Wraps the per-parameter
    methods DeepSpeed attaches; `take()` returns the count since the last take."""

    def __init__(self, params: list):
        self._bytes = 0
        ids = {id(p) for p in params}
        for p in params:
            for name in ("all_gather_coalesced", "all_gather"):
                setattr(p, name, self._counting(getattr(p, name), ids))

    def _counting(self, fn, ids: set):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        def wrapper(*args, **kwargs):
            group = args[0] if args else kwargs.get("params", kwargs.get("param_list"))
            for q in group or ():
                if id(q) in ids and q.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    self._bytes += q.ds_numel * q.ds_tensor.element_size()
            return fn(*args, **kwargs)
        return wrapper

    def take(self) -> int:
        n, self._bytes = self._bytes, 0
        return n


def shared_block_params(stage) -> list:
    """Parameters of the unique layers that run at recursion steps (step > 0)."""
    looped = {l.unique for l in stage.plan.layers[stage.start:stage.stop] if l.step > 0}
    return [p for u in sorted(looped) for p in stage.layers[str(u)].parameters()]
