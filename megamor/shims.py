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
3. The RNG tracker (forked around attention even with dropout 0) keeps CPU generator states, and
   activation recompute (`tensor_parallel.checkpoint`) stashes no CUDA generator state (there is
   none; the CPU state it also stashes is the one that matters).

`install_torch_adam_fixes()` repairs megatron's distributed optimizer where it wraps torch's
AdamW (always on CPU; on GPU only without Transformer Engine / apex fused Adam):
4. `state_dict` asserts one shared `step` over parameter states that a fresh AdamW does not have
   yet: give every parameter a zero state (what AdamW itself would start from) first.
5. Loading fully-reshardable parameter state copies into every state key, `step` included, which
   the checkpoint does not carry (KeyError): keep the current step for that copy.
6. Silent: loading gives every parameter the *same* step tensor, which AdamW then increments once
   per parameter, corrupting bias correction after resume; give each its own copy.
Only a resume-equality test catches 6 (tests/test_checkpoint.py).

`install_optimizer_fixes()` installs those and, for every distributed optimizer (torch, TE or
apex Adam alike):
7. A parameter group holding both fp32 and bf16 parameters (megamor's fp32 routers in a bf16
   model): megatron numbers the group's parameters in gradient-buffer order (bf16 buffer first)
   but gives the optimizer [fp32 shards, fp32 copies of the bf16 shards], so checkpointing reads
   and writes the optimizer state of the wrong parameter: saving fails on a size mismatch, or,
   where sizes agree, swaps states silently. The numbering is rebuilt in the optimizer's order
   (megatron-core 0.16.1 and 0.19.2 alike; `tests/test_bf16_program.py` resumes bitwise through
   it).
8. Fully-reshardable save with several gradient buckets per buffer (overlapped gradient
   reduction; a bucket of its own for each weight summed across pipeline stages): megatron
   gathers each bucket's optimizer state without its end padding, concatenated, but slices
   parameters out of that by their positions in the padded buffer, so every parameter after the
   first bucket is saved shifted by the padding before it (megatron's own TODO, "issue #504").
   The gathered state is laid out at the padded positions before it is sliced. With one bucket
   per buffer the two layouts coincide. tests/test_overlap.py resumes across such layouts.

The CUDA shims (1-3) do not run when CUDA is available. `tests/test_shims.py` shows that the megatron calls
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


# CPU tensor type names -> what megatron's optimizers expect from `param.type()` on a GPU.
_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
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
    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None


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


# ----------------------------------------------------------------------------- torch AdamW fixes


def _torch_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            yield inner


def _init_adam_states(optimizer) -> None:
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)


def _own_step_tensors(optimizer) -> None:
    for inner in _torch_optimizers(optimizer):
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].detach().clone()


_ADAM_FIXED = False


def install_torch_adam_fixes() -> None:
    """Fixes 4-6 above, once per process, when megatron uses torch's Adam."""
    global _ADAM_FIXED
    from megatron.core.optimizer import distrib_optimizer as dopt

    if _ADAM_FIXED or getattr(dopt, "HAVE_APEX_OR_TE", False):
        return
    cls = dopt.DistributedOptimizer
    state_dict, load_state_dict = cls.state_dict, cls.load_state_dict
    set_states = cls._set_main_param_and_optimizer_states

    def fixed_state_dict(self):
        _init_adam_states(self)
        return state_dict(self)

    def fixed_load_state_dict(self, sd):
        out = load_state_dict(self, sd)
        _own_step_tensors(self)
        return out

    def fixed_set_states(self, model_param, tensors):
        if "step" not in tensors:
            current = self._get_main_param_and_optimizer_states(model_param).get("step")
            if current is not None:
                tensors = {**tensors, "step": current.clone()}
        return set_states(self, model_param, tensors)

    cls.state_dict = fixed_state_dict
    cls.load_state_dict = fixed_load_state_dict
    cls._set_main_param_and_optimizer_states = fixed_set_states
    _ADAM_FIXED = True


# ----------------------------------------------------------------------------- every distributed optimizer


def _number_params_in_optimizer_order(optimizer) -> None:
    """Fix 7: (group index, order) of each model parameter as the optimizer holds them."""
    for gi, (fp32, half) in enumerate(zip(optimizer.model_fp32_groups,
                                          optimizer.model_float16_groups)):
        for order, p in enumerate([*fp32, *half]):
            optimizer.model_param_group_index_map[p] = (gi, order)


_GROUPS_FIXED = False


def install_optimizer_fixes() -> None:
    """Fix 7 for every distributed optimizer, and fixes 4-6 where megatron uses torch's Adam;
    once per process."""
    global _GROUPS_FIXED
    install_torch_adam_fixes()
    if _GROUPS_FIXED:
        return
    from megatron.core.optimizer import distrib_optimizer as dopt

    cls = dopt.DistributedOptimizer
    init = cls.__init__

    def numbered_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if getattr(self, "model_float16_groups", None) is not None:
            _number_params_in_optimizer_order(self)

    cls.__init__ = numbered_init
    _fix_fully_reshardable_bucket_padding(cls)
    _GROUPS_FIXED = True


def _padded_world_tensors(optimizer, state: dict) -> dict:
    """Fix 8: `get_parameter_state_dp_zero`'s world tensors (buckets concatenated without
    their end padding) laid out at the buckets' offsets in the padded buffer."""
    for gbuf_idx, by_dtype in enumerate(optimizer.gbuf_ranges):
        buffer = optimizer.buffers[gbuf_idx]
        padded = buffer.grad_data.numel()
        for dtype in by_dtype:
            world = state[gbuf_idx][dtype]
            for key in ("param", "exp_avg", "exp_avg_sq"):
                t = world.get(key)
                if t is None or t.numel() == padded:
                    continue
                out = t.new_zeros(padded)
                src = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    out[bucket.offset:bucket.offset + n] = t[src:src + n]
                    src += n
                assert src == t.numel(), (src, t.numel())
                world[key] = out
    return state


def _fix_fully_reshardable_bucket_padding(cls) -> None:
    save = cls.sharded_param_state_fully_reshardable
    gather = cls.get_parameter_state_dp_zero

    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        self._megamor_padded_world = True
        try:
            return save(self, *args, **kwargs)
        finally:
            self._megamor_padded_world = False

    def get_parameter_state_dp_zero(self, *args, **kwargs):
        state = gather(self, *args, **kwargs)
        if state is not None and getattr(self, "_megamor_padded_world", False):
            state = _padded_world_tensors(self, state)
        return state

    cls.sharded_param_state_fully_reshardable = sharded_param_state_fully_reshardable
    cls.get_parameter_state_dp_zero = get_parameter_state_dp_zero
