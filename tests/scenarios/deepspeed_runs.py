"""Multi-rank scenario for the DeepSpeed engine: one launch of the ranks runs every case and rank 0
writes one JSON file.

    torchrun --nproc-per-node=2 deepspeed_runs.py --root DIR [overrides]

Cases (each a fresh trainer, output under DIR/<case>):
- reference/<kind>: the megatron engine (the losses the DeepSpeed runs must reproduce);
- zero<k>/<kind>: the DeepSpeed engine at ZeRO stage k (and ZeRO-3 at tensor parallel 2);
- resume: ZeRO-2 and ZeRO-3 runs saving at step 2, resumed from step 2 to the end;
- offload: optimizer offload (ZeRO-2), optimizer + parameter offload (ZeRO-3), with what
  DeepSpeed's engine reports it was configured with;
- traffic: ZeRO-3 shared-block all-gather bytes with the block held over the loop and with
  DeepSpeed's per-module fetch (DeepSpeed told to release after every use, as it does for
  large models: no persistence of small parameters, no reuse window);
- logits: the ZeRO-3 mor_ec model's logits on a fixed input after training (for the export test);
- corrupt: resume2/full's checkpoints with one DeepSpeed engine-state file damaged: `auto`
  skips step 4 and resumes from step 2 (issue 19);
- nonfinite/zero2, nonfinite/zero3: NaN loss at step 3 of 4; the weights after every step.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megamor import parallel  # noqa: E402
from megamor.config import load_config  # noqa: E402
from megamor.training.loop import Trainer  # noqa: E402

KINDS = {
    "mor_ec": ["model.arch=mor", "routing.type=expert_choice"],
    "mor_tc": ["model.arch=mor", "routing.type=token_choice", "routing.z_loss_weight=0.001"],
    "vanilla": ["model.arch=vanilla"],
}
DS = ["parallel.engine=deepspeed"]
RELEASE_EVERY_USE = {"zero_optimization": {"stage3_max_reuse_distance": 0,
                                           "stage3_param_persistence_threshold": 0,
                                           "stage3_prefetch_bucket_size": 0}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.root)
    base = ["model.preset=tiny", "model.seq_length=64", "train.warmup_steps=1",
            "train.lr_schedule=constant", "train.lr=0.003", "train.train_steps=3",
            "train.global_batch_size=8", "train.micro_batch_size=2", "tracking.enabled=false",
            "tracking.depth_map_interval=0", *args.overrides]
    out: dict = {}

    def run(name: str, *extra: str, faults=None):
        cfg = load_config(None, [*base, f"run.output_dir={root / name}", *extra])
        trainer = Trainer(cfg)
        sums = []
        if faults:  # issue 19: inject non-finite losses, record the weights after every step
            from checkpoint_faults import inject, weights_sum
            inject(trainer, faults)
            sums.append(weights_sum(trainer))
            step = trainer.train_step

            def recorded():
                m = step()
                sums.append(weights_sum(trainer))
                return m
            trainer.train_step = recorded
        hist = trainer.train()
        out[name] = {"loss": [m["loss"] for m in hist],
                     "grad_norm": [m["grad_norm"] for m in hist],
                     "zero3": [{k: v for k, v in m.items() if k.startswith("zero3/")} for m in hist],
                     "nonfinite": [m.get("nonfinite", 0) for m in hist], "weights": sums,
                     "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None}
        return trainer

    ids = torch.arange(1, 49).unsqueeze(0)

    def logits_of(trainer) -> list:
        model = trainer.engine.model
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids.remainder(trainer.vocab_size))[:, 0].tolist()

    for kind, spec in KINDS.items():
        trainer = run(f"reference/{kind}", *spec)
        if kind == "mor_ec":
            out["reference/mor_ec"]["logits"] = logits_of(trainer)
    for z, kinds in ((1, ["mor_ec"]), (2, ["mor_ec", "mor_tc", "vanilla"]), (3, list(KINDS))):
        for kind in kinds:
            run(f"zero{z}/{kind}", *KINDS[kind], *DS, f"parallel.zero_stage={z}")

    # Tensor parallel 2 (megatron's groups as DeepSpeed's mpu; data parallel 1).
    tp2 = ["parallel.tensor_model_parallel_size=2"]
    run("reference/mor_ec_tp2", *KINDS["mor_ec"], *tp2)
    run("zero3/mor_ec_tp2", *KINDS["mor_ec"], *tp2, *DS, "parallel.zero_stage=3")

    # Stop and resume: save at step 2 of 4, resume from it in a second trainer.
    for z in (2, 3):
        spec = [*KINDS["mor_ec"], *DS, f"parallel.zero_stage={z}", "train.train_steps=4",
                "checkpoint.save_interval=2", "checkpoint.keep_last=3"]
        run(f"resume{z}/full", *spec)
        ckpt = root / f"resume{z}/full" / "checkpoints" / "step_00000002"
        run(f"resume{z}/resumed", *spec, f"checkpoint.resume={ckpt}")

    # Issue 19: one DeepSpeed engine-state file damaged in the newest checkpoint (same size):
    # `auto` skips it with a line naming the file and resumes from step 2; a NaN loss at step 3
    # leaves the weights as they were under ZeRO-2 and ZeRO-3.
    import shutil
    if dist.get_rank() == 0:
        shutil.copytree(root / "resume2/full" / "checkpoints", root / "corrupt" / "checkpoints")
        state = sorted((root / "corrupt" / "checkpoints" / "step_00000004" / "deepspeed")
                       .rglob("*optim_states.pt"))[0]
        raw = bytearray(state.read_bytes())
        raw[-4096:] = bytes(b ^ 0xFF for b in raw[-4096:])
        state.write_bytes(bytes(raw))
        out["corrupt/file"] = str(state)
    dist.barrier()
    run("corrupt", *KINDS["mor_ec"], *DS, "parallel.zero_stage=2", "train.train_steps=4",
        "checkpoint.save_interval=2", "checkpoint.keep_last=3", "checkpoint.resume=auto")
    for z in (2, 3):
        run(f"nonfinite/zero{z}", *KINDS["mor_ec"], *DS, f"parallel.zero_stage={z}",
            "train.train_steps=4", faults={3: float("nan")})

    # Offload: the config reaches DeepSpeed and training proceeds.
    for name, extra in (("offload/zero2_optimizer", ["parallel.zero_stage=2",
                                                    "parallel.offload_optimizer=cpu"]),
                        ("offload/zero3_all", ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu",
                                               "parallel.offload_params=cpu"])):
        trainer = run(name, *KINDS["mor_ec"], *DS, *extra)
        e = trainer.engine.model
        out[name]["engine"] = {"offload_optimizer": bool(e.zero_offload_optimizer()),
                               "offload_param": bool(e.zero_offload_param()),
                               "zero_stage": e.zero_optimization_stage(),
                               "optimizer": type(e.optimizer.optimizer).__name__
                               if hasattr(e.optimizer, "optimizer") else type(e.optimizer).__name__}

    # Shared-block traffic under ZeRO-3, DeepSpeed releasing after every use.
    overrides = root / "release_every_use.json"
    if dist.get_rank() == 0:
        overrides.write_text(json.dumps(RELEASE_EVERY_USE))
    dist.barrier()
    for mode in ("once", "deepspeed"):
        trainer = run(f"traffic/{mode}", *KINDS["mor_ec"], *DS, "parallel.zero_stage=3",
                      f"parallel.zero3_shared_block={mode}", f"parallel.deepspeed_config={overrides}")
        if mode == "once":
            out["traffic/once"]["residency_gathers"] = trainer.engine.residency.gathers
            from megamor.engines.zero3 import shared_block_params
            out["traffic/shared_block_bytes"] = sum(
                p.ds_numel * p.ds_tensor.element_size() for p in shared_block_params(trainer.engine.stage))
            out["traffic/num_microbatches"] = trainer.engine.num_microbatches

    # Logits of the trained ZeRO-3 model (its final checkpoint is exported by the test).
    trainer = run("logits", *KINDS["mor_ec"], *DS, "parallel.zero_stage=3",
                  "tracking.depth_map_interval=3")  # and a training depth map at step 3
    out["logits"] = logits_of(trainer)
    out["logits_ids"] = ids[0].remainder(trainer.vocab_size).tolist()

    # Between engines: weights move both ways (checkpoint.init_from); optimizer state does not.
    ds_ckpt = root / "logits" / "checkpoints"
    meg_ckpt = root / "reference/mor_ec" / "checkpoints"
    for name, extra in (("cross/megatron_from_deepspeed", [f"checkpoint.init_from={ds_ckpt}"]),
                        ("cross/deepspeed_from_megatron", [*DS, "parallel.zero_stage=3",
                                                           f"checkpoint.init_from={meg_ckpt}"])):
        cfg = load_config(None, [*base, *KINDS["mor_ec"], f"run.output_dir={root / name}", *extra])
        trainer = Trainer(cfg)  # weights loaded, not trained further
        out[name] = {"logits": logits_of(trainer)}
    from megamor.checkpoint import CheckpointError
    try:
        Trainer(load_config(None, [*base, *KINDS["mor_ec"], f"checkpoint.resume={ds_ckpt}",
                                          f"run.output_dir={root / 'cross/refused'}"]))
        out["cross/refused"] = None
    except CheckpointError as e:
        out["cross/refused"] = str(e)
    if dist.get_rank() == 0:
        (root / "result.json").write_text(json.dumps(out))
    parallel.shutdown()


if __name__ == "__main__":
    main()
