"""Each CPU shim is needed: the same megatron call fails without it and works with it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # 12 interpreters, each importing megatron

CASES = {
    # literal device="cuda" bookkeeping tensors (optimizer flags, pipeline token counts)
    "device": "from megatron.core.optimizer.grad_scaler import ConstantGradScaler; ConstantGradScaler(1.0)",
    # torch.cuda.current_device() feeding device= arguments (p2p shape exchange, DDP buffers)
    "current_device": "import torch; torch.empty(2, device=torch.cuda.current_device())",
    # the model-parallel RNG tracker forked around attention
    "rng": ("from megatron.core.tensor_parallel import random as r; r.initialize_rng_tracker(force_reset=True);"
            "t=r.get_cuda_rng_tracker(); t.add('model-parallel-rng', 3)\nwith t.fork(): pass"),
    # megatron 0.19's grad sync asks for the current CUDA stream (to wait on CUDA-graph events)
    "stream": "import torch; torch.cuda.current_stream()",
    # optimizer / clipping type checks that demand torch.cuda.FloatTensor
    "type_check": ("import torch; from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32\n"
                   "p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)\n"
                   "clip_grad_by_total_norm_fp32([p], 1.0, 10.0); assert p.grad[0] < 1"),
    # .cuda() moves of state tensors
    "to_cuda": "import torch; torch.ones(1).cuda()",
}


def run(code: str, shims: bool) -> subprocess.CompletedProcess:
    pre = "import warnings; warnings.filterwarnings('ignore')\n"
    if shims:
        pre += "from megamor.shims import install_cpu_shims; assert install_cpu_shims()\n"
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_shim_is_needed_and_sufficient(case):
    without = run(CASES[case], shims=False)
    assert without.returncode != 0, f"{case} works without the shim: the shim may be obsolete"
    assert "cuda" in (without.stderr.lower()), without.stderr[-500:]
    with_ = run(CASES[case], shims=True)
    assert with_.returncode == 0, with_.stderr[-2000:]
