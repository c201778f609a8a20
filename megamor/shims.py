"""CPU shims over megatron-core's CUDA assumptions (and its torch-AdamW resume bugs).

megatron-core 0.16-0.19 runs its math on any device, but its bookkeeping assumes CUDA: small
tensors created with a literal `device="cuda"` or `torch.cuda.current_device()` (pipeline token
counts and shape exchange, optimizer flags, grad-norm buffers, DDP buffers), `.cuda()` moves,
`torch.cuda.synchronize()`, the CUDA RNG tracker, and two type checks for
`torch.cuda.FloatTensor`. On a machine without a GPU, `install_cpu_shims()` makes these land on
the CPU:

1. `_CudaToCpu`, a torch function mode, rewrites a CUDA `device=` argument of tensor factory
   calls to CPU and turns `Tensor.cuda()` into a no-op; `Tensor.type()` reports CPU float tensors
   as `torch.cuda.FloatTensor` so the optimizer's dtype checks accept fp32 CPU params. One mode
   instead of patching ~15 call sites.
2. `torch.cuda.current_device()` returns "cpu" (it feeds `device=` arguments),
   `torch.cuda.synchronize()` is a no-op (nothing to wait for) and `torch.cuda.current_stream()`
   returns the CPU stream, whose waits are no-ops (0.19's grad sync asks for it).
3. The RNG tracker (forked around attention even with dropout 0) keeps CPU generator states.

Nothing here runs when CUDA is available. `tests/test_shims.py` shows that the megatron calls
behind 1-3 fail without these shims and work with them.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return "torch.cuda.FloatTensor" if name == "torch.FloatTensor" else name
        return func(*args, **kwargs)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker API over CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def install_cpu_shims() -> bool:
    """Install the shims once per process when no GPU is visible. Returns True if installed."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    # 0.19's DDP grad sync asks for the current stream unconditionally (CUDA-graph wait events).
    torch.cuda.current_stream = lambda *a, **k: torch.cpu.current_stream()
    _install_rng_tracker()
    _CudaToCpu().__enter__()  # process-wide, for the lifetime of this CPU-only process
    _INSTALLED = True
    return True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """megatron's `model_parallel_cuda_manual_seed`, CPU flavour (same stream names/offsets)."""
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
