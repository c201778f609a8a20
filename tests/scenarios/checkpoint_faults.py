"""Multi-rank scenario: the faults and mistakes of issue 19, one launch of the ranks, each case a
fresh trainer (data parallel over the ranks), rank 0 writing one JSON file.

    torchrun --nproc-per-node=2 checkpoint_faults.py --root DIR --out FILE [--tmpfs DIR] [overrides]

- base: 6 steps, saves at 2, 4, 6 (keep_last 2: step 2 rotated away);
- refused: a fresh run into base's directory (the error; nothing deleted);
- corrupt_explicit / corrupt_auto: copies of base's checkpoints with 4 KB flipped in the newest
  shard, resumed by path (the error) and with `auto` to step 8 (falls back to step 4);
- new_lineage: a fresh run into a copy of base's directory with checkpoint.new_lineage=true;
- nonfinite: NaN loss at steps 3 and 4, the loss x10 at step 14 (a spike), 14 steps, tracked in
  MLflow; the sum of the weights after every step;
- nonfinite_stop: NaN from step 2 on, train.max_nonfinite_in_row=3 (the error);
- disk_full_sync / disk_full_async (with --tmpfs, a small tmpfs): checkpoint.dir there, the
  second save does not fit (the error on each rank).
"""

import argparse
import json
import shutil
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megamor import parallel  # noqa: E402
from megamor.config import load_config  # noqa: E402
from megamor.training.loop import Trainer  # noqa: E402


def weights_sum(trainer) -> float:
    """Sum of every weight (ZeRO-3 partitions summed over the ranks): equal iff nothing moved,
    to the precision that matters here."""
    total = torch.zeros(1, dtype=torch.float64)
    for p in trainer.engine.stage.parameters():
        t = getattr(p, "ds_tensor", None)
        total += (t if t is not None else p).detach().double().sum().cpu()
    dist.all_reduce(total)
    return float(total)


def inject(trainer, steps: dict) -> None:
    """Multiply the per-token loss the stage returns by `steps[k]` at training step k."""
    stage = trainer.engine.stage
    forward = stage.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        factor = steps.get(trainer.step + 1)
        if factor is not None and kwargs.get("labels") is not None and stage.training:
            out = out * factor
        return out

    stage.forward = patched


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tmpfs", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated subset")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.root)
    base = ["model.preset=tiny", "model.arch=mor", "model.seq_length=64",
            "train.lr_schedule=constant", "train.warmup_steps=1", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.log_interval=1", "tracking.enabled=false",
            "tracking.depth_map_interval=0", *args.overrides]
    wanted = set(args.cases.split(",")) if args.cases else None
    out: dict = {}

    def cfg(name, *extra):
        return load_config(None, [*base, f"run.output_dir={root / name}", *extra])

    def run(name, *extra, faults=None, record=False):
        if wanted is not None and name not in wanted:
            return None
        res = out[name] = {}
        try:
            trainer = Trainer(cfg(name, *extra))
            res["resumed_from"] = str(trainer.resumed_from) if trainer.resumed_from else None
            if faults:
                inject(trainer, faults)
            if record:
                sums, step = [weights_sum(trainer)], trainer.train_step

                def recorded():
                    m = step()
                    sums.append(weights_sum(trainer))
                    return m

                trainer.train_step = recorded
                res["weights"] = sums
            res["history"] = [{k: v for k, v in m.items() if not isinstance(v, list)}
                              for m in trainer.train()]
        except Exception as e:  # noqa: BLE001 - the errors are what some cases are about
            res["error"] = {"type": type(e).__name__, "message": str(e),
                            "consequence": getattr(e, "consequence", None)}
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, res["error"])
            res["errors"] = gathered
        return res

    def on_rank0(fn):
        if dist.get_rank() == 0:
            fn()
        dist.barrier()

    def flip_newest_shard(ck: Path) -> None:
        newest = sorted(ck.glob("step_*"))[-1]
        shard = newest / "__0_0.distcp"
        raw = bytearray(shard.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 4096] = bytes(b ^ 0xFF for b in raw[mid:mid + 4096])
        shard.write_bytes(bytes(raw))

    def copy_corrupted(name):
        def do():
            shutil.copytree(root / "base" / "checkpoints", root / name / "checkpoints")
            flip_newest_shard(root / name / "checkpoints")
        return do

    six = ["train.train_steps=6", "checkpoint.save_interval=2", "checkpoint.keep_last=2"]
    run("base", *six)
    out["base_listing"] = sorted(p.name for p in (root / "base" / "checkpoints").iterdir())
    run("refused", *six, "run.output_dir=" + str(root / "base"))
    out["base_listing_after"] = sorted(p.name for p in (root / "base" / "checkpoints").iterdir())

    on_rank0(copy_corrupted("corrupt_explicit"))
    ck = root / "corrupt_explicit" / "checkpoints"
    run("corrupt_explicit", "train.train_steps=8", f"checkpoint.resume={ck / 'step_00000006'}")
    on_rank0(copy_corrupted("corrupt_auto"))
    run("corrupt_auto", "train.train_steps=8", "checkpoint.save_interval=2",
        "checkpoint.keep_last=3", "checkpoint.resume=auto")

    on_rank0(lambda: shutil.copytree(root / "base" / "checkpoints",
                                     root / "new_lineage" / "checkpoints"))
    run("new_lineage", "train.train_steps=2", "checkpoint.save_interval=1",
        "checkpoint.keep_last=1", "checkpoint.new_lineage=true")
    prev = root / "new_lineage" / "checkpoints" / "previous"
    out["new_lineage_listing"] = {
        "root": sorted(p.name for p in (root / "new_lineage" / "checkpoints").iterdir()),
        "previous": sorted(str(p.relative_to(prev)) for p in prev.glob("*/*"))
        if prev.exists() else []}

    nan = float("nan")
    run("nonfinite", "train.train_steps=14", "tracking.enabled=true",  # the run dir's own store
        faults={3: nan, 4: nan, 14: 10.0}, record=True)
    run("nonfinite_stop", "train.train_steps=8", "train.max_nonfinite_in_row=3",
        faults={k: nan for k in range(2, 9)})

    if args.tmpfs:
        for mode in ("sync", "async"):
            name = f"disk_full_{mode}"
            res = run(name, "train.train_steps=4", "checkpoint.save_interval=2",
                      f"checkpoint.dir={Path(args.tmpfs) / mode}",
                      f"checkpoint.async_save={'true' if mode == 'async' else 'false'}")
            if res is not None:
                res["listing"] = sorted(p.name for p in (Path(args.tmpfs) / mode).iterdir())
                from megamor.checkpoint import CheckpointError, verify_checkpoint
                try:
                    res["previous"] = verify_checkpoint(Path(args.tmpfs) / mode / "step_00000002")
                except CheckpointError as e:
                    res["previous"] = f"FAILED: {e}"
            on_rank0(lambda: shutil.rmtree(Path(args.tmpfs) / mode))  # room for the next case
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out))
    parallel.shutdown()


if __name__ == "__main__":
    main()
