"""A tiny model stage in a world of one process, for the in-process model tests
(test_model.py, test_kernels.py): `world_of_one` (a module-scoped fixture), `make_model`,
`tokens`."""

import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

from megamor import parallel
from megamor.config import load_config
from megamor.inference import build_single_process_model
from megamor.shims import install_cpu_shims, seed_model_parallel_rng

SEQ, BATCH, VOCAB = 48, 3, 256


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    install_cpu_shims()
    parallel.initialize(1, 1, torch.device("cpu"))
    seed_model_parallel_rng(1, 0)
    yield
    parallel.shutdown()


def make_model(*overrides, fp8=False, dtype=torch.float32):
    """The tiny preset at sequence SEQ, one stage, seed 7 (`fp8`: the TransformerConfig of an
    FP8 run, which on CPU changes what runs around the layers, not their arithmetic; `dtype`:
    the parameters' dtype, bf16 for a stage that megamor.precision.wrap_for_precision wraps)."""
    cfg = load_config(None, ["model.preset=tiny", f"model.seq_length={SEQ}", *overrides]).validate(1)
    return build_single_process_model(cfg, VOCAB, seed=7, dtype=dtype, fp8=fp8,
                                      local_backend=False)[0]


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
