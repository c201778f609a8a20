"""Bad configs fail at start-up with one error that names the option and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from megamor.config import ConfigError, load_config


def err(*overrides, world=None, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides)).validate(world)
    return str(e.value)


def test_defaults_are_valid_and_presets_load():
    load_config().validate(2)
    for preset in ("tiny", "135m", "360m", "730m", "1p7b"):
        load_config(None, [f"model.preset={preset}"]).validate()


def test_heads_not_divisible_by_tp():
    msg = err("model.preset=135m", "parallel.tensor_model_parallel_size=2")
    assert "num_attention_heads=9" in msg and "tensor_model_parallel_size=2" in msg


def test_layers_not_fitting_recursions_and_strategy():
    msg = err("model.num_layers=30", "model.preset=135m", "model.num_layers=30")
    assert "num_layers=30" in msg and "use model.num_layers=32" in msg
    assert "use model.num_layers=9" in err("model.sharing=cycle", "model.num_layers=8")


def test_increasing_capacity_schedule():
    msg = err("routing.capacity=[0.5,1.0,0.3]")
    assert "routing.capacity" in msg and "increases" in msg
    assert "one per recursion step" in err("routing.capacity=[1.0,0.5]")


def test_pipeline_larger_than_unrolled_depth():
    msg = err("parallel.pipeline_model_parallel_size=9")
    assert "pipeline_model_parallel_size=9" in msg and "num_layers=8" in msg


def test_virtual_pipeline_rules():
    pp2 = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_size=2"]
    ok = load_config(None, [*pp2, "parallel.pipeline_layers=[2,0,3,3]"]).validate(2)
    assert ok.parallel.virtual_pipeline_size == 2
    assert "needs parallel.pipeline_model_parallel_size > 1" in err(
        "parallel.virtual_pipeline_size=2")
    assert "virtual_pipeline_size=0 must be an integer >= 1" in err(
        "parallel.virtual_pipeline_size=0")
    msg = err(*pp2, "parallel.pipeline_layers=[4,4]")
    assert "parallel.pipeline_layers=[4, 4]" in msg and "= 4 entries" in msg
    assert "the first and the last need a layer" in err(*pp2, "parallel.pipeline_layers=[0,4,4,0]")
    # micro-batches per step: 8 / (4 x dp 2) = 1, not a multiple of pp 2
    msg = err(*pp2, "train.global_batch_size=8", "train.micro_batch_size=4", world=4)
    assert "multiple of pipeline_model_parallel_size=2" in msg and "= 1" in msg
    assert "parallel.engine=deepspeed runs without pipeline parallelism" in err(
        *pp2, "parallel.engine=deepspeed")


def test_world_size_and_batch_arithmetic():
    assert "not divisible by tensor x pipeline" in err("parallel.tensor_model_parallel_size=2", world=3)
    assert "global_batch_size=10" in err("train.global_batch_size=10", "train.micro_batch_size=4")


def test_unknown_and_mistyped_options(tmp_path):
    assert "unknown option 'hiden_size'" in err("model.hiden_size=3")
    assert "expected an integer" in err("model.hidden_size=abc")
    assert "section.option=value" in err("hidden_size=3")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: transformer\n")
    assert "model.arch='transformer'" in err(path=bad)
    bad.write_text("modle: {}\n")
    assert str(bad) in err(path=bad) and "unknown section 'modle'" in err(path=bad)
    assert "does not exist" in err(path=tmp_path / "missing.yaml")


def test_depth_map_options():
    assert "tracking.depth_map_interval=-1 must be >= 0" in err("tracking.depth_map_interval=-1")
    cfg = load_config(None, ["tracking.depth_map_interval=0", "tracking.depth_map_text=a b c"])
    assert cfg.validate().tracking.depth_map_text == "a b c"
    assert load_config().tracking.depth_map_interval is None  # default: with checkpoint saves


def test_kv_sharing_rules():
    assert "pipeline_model_parallel_size > 1" in err("model.kv_sharing=true",
                                                      "parallel.pipeline_model_parallel_size=2")
    assert "capacity[0] == 1" in err("model.kv_sharing=true", "routing.capacity=[0.9,0.5,0.2]")


def test_sequence_parallel_rules():
    tp2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    for kind in (["model.arch=vanilla"], ["model.arch=recursive"], ["model.arch=mor"],
                 ["model.arch=mor", "routing.type=token_choice"],
                 ["model.arch=mor", "model.kv_sharing=true"]):
        assert load_config(None, [*kind, *tp2]).validate(2).parallel.sequence_parallel
    assert "needs tensor_model_parallel_size > 1" in err("parallel.sequence_parallel=true")
    assert "model.seq_length=63 is not divisible" in err("model.seq_length=63", *tp2)
    assert "parallel.engine=megatron" in err("parallel.engine=deepspeed", *tp2)


def test_cli_reports_config_errors_before_starting_ranks():
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "pretrain", "--nproc", "3",
                           "parallel.tensor_model_parallel_size=2"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "world size 3 is not divisible" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "config", "show",
                           "model.preset=360m"], capture_output=True, text=True)
    assert proc.returncode == 0 and "hidden_size: 960" in proc.stdout


def test_gpu_only_paths_fail_clearly_without_a_gpu():
    import torch
    from megamor.model.specs import spec_for_run
    from megamor.device import resolve_device
    from megamor.precision import resolve_precision

    cpu = torch.device("cpu")
    for prec in ("bf16", "fp8"):
        with pytest.raises(RuntimeError, match=f"precision={prec} needs a CUDA GPU"):
            resolve_precision(load_config(None, [f"train.precision={prec}"]), cpu)
    assert resolve_precision(load_config(), cpu) == (torch.float32, False)
    with pytest.raises(RuntimeError, match="train.device=cuda but no CUDA GPU"):
        resolve_device(load_config(None, ["train.device=cuda"]))
    with pytest.raises(RuntimeError, match="backend=te needs"):
        spec_for_run("te", load_config().model, load_config().routing)


def test_cpu_bf16_is_an_explicit_opt_in(monkeypatch):
    """MEGAMOR_CPU_BF16=1 (the suite, anyone testing the GPU program on a CPU) lifts the CPU
    refusal of bf16, and of bf16 only."""
    import torch
    from megamor.precision import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv("MEGAMOR_CPU_BF16", "1")
    assert resolve_precision(load_config(None, ["train.precision=bf16"]), cpu) == \
        (torch.bfloat16, False)
    assert resolve_precision(load_config(), cpu) == (torch.float32, False)  # auto: still fp32
    with pytest.raises(RuntimeError, match="precision=fp8 needs a CUDA GPU"):
        resolve_precision(load_config(None, ["train.precision=fp8"]), cpu)
    monkeypatch.setenv("MEGAMOR_CPU_BF16", "0")
    with pytest.raises(RuntimeError, match="precision=bf16 needs a CUDA GPU"):
        resolve_precision(load_config(None, ["train.precision=bf16"]), cpu)


@pytest.mark.parametrize("visible,local_rank,local_world,want", [
    (8, 5, "8", 5),     # every rank sees the node's GPUs: cuda:LOCAL_RANK
    (1, 5, "8", 0),     # srun --gpus-per-task=1 / gpu-bind: each rank sees its own as cuda:0
    (1, 0, None, 0),
    (4, 3, None, 3),    # local world size unknown: LOCAL_RANK when it fits
    (2, 5, "8", None),  # neither all nor one: no rule is right
])
def test_the_gpu_of_a_rank_follows_what_it_sees(monkeypatch, visible, local_rank, local_world,
                                               want):
    import torch
    from megamor.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if local_world:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(None, ["train.device=cuda"])
    if want is None:
        with pytest.raises(RuntimeError, match=f"LOCAL_RANK={local_rank} of 8 ranks on this "
                                               f"node, but this rank sees {visible} GPUs"):
            resolve_device(cfg)
    else:
        assert resolve_device(cfg) == torch.device("cuda", want)


def test_option_errors_name_the_override_not_defaults():
    """Issue 19 item 7: errors about command-line options said `<defaults>:`."""
    for override, words in (("model.hiden_size=3", ["model.hiden_size=3: unknown option 'hiden_size'"]),
                            ("modle.x=1", ["modle.x=1: unknown section 'modle'"]),
                            ("model.hidden_size=abc", ["model.hidden_size: expected an integer"]),
                            ("model.preset=nope", ["model.preset='nope' is unknown"])):
        msg = err(override)
        assert "<defaults>" not in msg and all(w in msg for w in words), msg


def test_help_and_config_show_do_not_load_torch():
    """Issue 19 item 7: `megamor --help` and `config show` answered in seconds, importing
    megatron-core; they must not import torch at all (the timing itself is not asserted)."""
    code = ("import sys, contextlib, io\n"
            "from megamor.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "    main(['config', 'show', 'model.preset=1p7b'])\n"
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_paper_presets_carry_the_batch_of_their_slurm_scripts():
    """Issue 19 item 7: the 1p7b preset trained with global batch 16 while the planner assumed
    256 and the Slurm script set 256."""
    import re
    from megamor.presets import PRESET_TRAIN
    root = Path(__file__).resolve().parents[1]
    for preset, train in PRESET_TRAIN.items():
        script = (root / "slurm" / f"pretrain_{preset}.sh").read_text()
        gbs = int(re.search(r"^DEFAULT_GBS=(\d+)", script, re.M).group(1))
        mbs = int(re.search(r"^DEFAULT_MBS=(\d+)", script, re.M).group(1))
        cfg = load_config(None, [f"model.preset={preset}"])
        assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (gbs, mbs) == \
            (train["global_batch_size"], train["micro_batch_size"])
    # explicit options still win over the preset's
    assert load_config(None, ["model.preset=1p7b", "train.global_batch_size=64"]).train.global_batch_size == 64
