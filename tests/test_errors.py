"""Error kinds: each input error names its kind on its class (megamor/errors.py), so the one-line
report and the bad-input exit code do not depend on class names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megamor import errors
from megamor.checkpoint import CheckpointError
from megamor.config import ConfigError
from megamor.data import DataError
from megamor.preflight import PreflightError
from megamor.schedule import ScheduleError
from megamor.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("exc, kind", [
    (ConfigError("train.lr=-1: need lr > 0"), "config"),
    (ScheduleError("train.schedule=x"), "config"),
    (DataError("shard x: sha256 mismatch"), "data"),
    (TokenizerError("tokenizer.json missing"), "data"),
    (CheckpointError("step_1: truncated shard file"), "checkpoint"),
    (PreflightError("output", "run.output_dir=x is a file"), "output"),
])
def test_input_errors_carry_their_kind(exc, kind):
    assert errors.error_kind(exc) == kind
    assert errors.one_line(exc) == f"megamor: {kind} error: {exc}"
    assert isinstance(exc, errors.input_errors())
    # Still the built-in bases callers catch.
    assert isinstance(exc, ValueError if kind in ("config", "data") else RuntimeError)


def test_other_errors_are_training_errors():
    class DataError(Exception):  # a third-party class of the same name is not a data error
        pass

    for exc in (RuntimeError("boom\nsecond line"), DataError("x")):
        assert errors.error_kind(exc) == "training"
        assert not isinstance(exc, errors.input_errors())
    assert errors.one_line(RuntimeError("boom\nsecond line")) == \
        "megamor: training error: RuntimeError: boom second line"


def test_errors_module_is_a_leaf():
    tree = ast.parse((ROOT / "megamor" / "errors.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("megamor", "tokenizer", "launch")}


def test_library_notices_are_filtered_and_nothing_else():
    """What `quiet_library_notices` drops (by logger and message) and what still gets through:
    a CPU run's stderr carries megamor's lines, not torch's or megatron-core 0.19's notices."""
    import logging
    import warnings

    from megamor.console import _LIBRARY_NOTICES, _TORCH_WARNINGS, quiet_library_notices

    notices = {"torch.utils.cpp_extension": "No CUDA runtime is found, using CUDA_HOME='/usr'",
               "megatron.core.transformer.transformer_layer":
                   "Rewrapping ModuleSpec with module <class 'functools.partial'> to forward",
               "megatron.core.distributed.distributed_data_parallel":
                   "DistributedDataParallel: full_param_layout not provided with ...",
               "megatron.core.dist_checkpointing.strategies.torch":
                   "MCore's async save is deprecated and will be removed"}
    assert set(notices) == set(_LIBRARY_NOTICES)

    def passes(name: str, message: str) -> bool:
        return logging.getLogger(name).filter(logging.LogRecord(
            name, logging.WARNING, __file__, 1, message, None, None))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_notices()
        for name, message in notices.items():
            assert not passes(name, message), name
            assert passes(name, "CUDA version mismatch: extension built for 12.1"), name
        for text in ("torch.distributed is disabled, unavailable or uninitialized, assuming",
                     "The argument order of load has been changed. Please check the document"):
            warnings.warn(text, UserWarning)
        warnings.warn("a checkpoint shard is missing", UserWarning)
    assert len(_TORCH_WARNINGS) == 2
    assert [str(w.message) for w in caught] == ["a checkpoint shard is missing"]
