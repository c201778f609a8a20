"""Multi-rank scenario: train several model kinds for a few steps in one launch of the ranks.

Run under torchrun (or alone, as the single-process reference). Rank 0 writes a JSON file with,
per kind: the losses and router statistics of every step, the tokens each unrolled layer
processed, per-stage token totals, and whether every copy of every shared weight is identical.
A kind `K+sp` is kind K with sequence parallelism on. Each kind writes into its own directory
under run.output_dir (a run directory belongs to one run: megamor/lineage.py).

`--guard`: the whole launch runs under megamor's collective guard
(megamor/testing/collective_guard.py); each kind's record then lists the torch.distributed calls
its run made on rank 0 ("function @ megamor caller") and any tensor an NCCL group would reject.
"""

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore")

GUARD = None
if "--guard" in sys.argv:  # before megatron is imported: it captures collectives at import
    from megamor.testing import collective_guard
    from megamor.shims import install_cpu_shims

    install_cpu_shims()
    GUARD = collective_guard.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megamor import parallel  # noqa: E402
from megamor.config import load_config  # noqa: E402
from megamor.training.depth_maps import routing_depths  # noqa: E402
from megamor.training.loop import Trainer  # noqa: E402

KINDS = {
    "vanilla": ["model.arch=vanilla"],
    "recursive": ["model.arch=recursive"],
    "mor_ec": ["model.arch=mor", "routing.type=expert_choice"],
    "mor_tc": ["model.arch=mor", "routing.type=token_choice", "routing.z_loss_weight=0.001"],
    "mor_tc_free": ["model.arch=mor", "routing.type=token_choice", "routing.balancing=loss_free",
                    "routing.bias_update_rate=0.01"],
    "mor_ec_kvshare": ["model.arch=mor", "routing.type=expert_choice", "model.kv_sharing=true"],
    "mor_ec_auxrouter": ["model.arch=mor", "routing.type=expert_choice", "routing.causal=aux_router"],
    "recursive_seq": ["model.arch=recursive", "model.sharing=sequence", "model.num_layers=6"],
}


def shared_copies_identical(trainer) -> dict:
    """Every (unique layer, param, tp rank) must be bit-identical on every stage holding it;
    tied embedding/output copies too."""
    dims, stage = trainer.dims, trainer.engine.stage
    mine = {}
    for u, layer in stage.layers.items():
        for name, p in layer.named_parameters():
            mine[(int(u), name, dims.tp_rank, dims.dp_rank)] = p.detach().clone()
    w = stage.shared_embedding_or_output_weight()
    if w is not None:
        mine[("embedding", "weight", dims.tp_rank, dims.dp_rank)] = w.detach().clone()
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, mine)
    seen, copies, mismatched = {}, 0, []
    for d in gathered:
        for (u, name, tp, dp), t in d.items():
            key = (u, name, tp)
            if key in seen:
                copies += 1
                if not torch.equal(seen[key], t):
                    mismatched.append(f"{u}:{name}:tp{tp}")
            else:
                seen[key] = t
    return {"copies_compared": copies, "mismatched": sorted(set(mismatched))}


def record_layouts(trainer):
    """Hooks recording, for the first training forward of this stage, the first dimension of
    every unrolled layer's input (tokens per rank: s/tp under sequence parallelism) and the
    shape of the tensor received from the previous stage. Returns a function that gathers them
    over all ranks: {"layer_rows": [rows per unrolled layer], "wire": [[shape] per stage > 0]}."""
    stage, calls, wire = trainer.engine.stage, [], []
    if len(stage.parts) > 1:  # a virtual pipeline's chunks interleave their calls: not recorded
        return dict
    for layer in stage.layers.values():
        layer.register_forward_pre_hook(
            lambda mod, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    stage.register_forward_pre_hook(
        lambda mod, a, kw: wire.append(None if mod.input_tensor is None else list(mod.input_tensor.shape)),
        with_kwargs=True)

    def gathered() -> dict:
        n = stage.stop - stage.start
        mine = {"rows": {stage.start + i: r for i, r in enumerate(calls[:n])},
                "wire": wire[0] if wire else None, "stage": trainer.dims.pp_rank}
        every = [None] * trainer.dims.world_size
        dist.all_gather_object(every, mine)
        rows = {i: r for d in every for i, r in d["rows"].items()}
        wires = {d["stage"]: d["wire"] for d in every if d["wire"] is not None}
        return {"layer_rows": [rows[i] for i in sorted(rows)],
                "wire": [wires[k] for k in sorted(wires)]}
    return gathered


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kinds", default="vanilla,recursive,mor_ec,mor_tc")
    ap.add_argument("--guard", action="store_true", help="record collectives (module docstring)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = {}
    out_dir = next((o.split("=", 1)[1] for o in reversed(args.overrides)
                    if o.startswith("run.output_dir=")), "runs/train_kinds")
    for kind in args.kinds.split(","):
        base, _, variant = kind.partition("+")
        extra = {"": [], "sp": ["parallel.sequence_parallel=true"]}[variant]
        cfg = load_config(None, ["model.preset=tiny", "model.seq_length=64", "train.warmup_steps=1",
                                 "train.lr_schedule=constant", "train.lr=0.003",
                                 *KINDS[base], *args.overrides, *extra,
                                 f"run.output_dir={Path(out_dir) / kind}"])
        t0 = time.perf_counter()
        calls_before = Counter(GUARD.calls) if GUARD else None
        violations_before = len(GUARD.violations) if GUARD else 0
        trainer = Trainer(cfg)
        layouts = record_layouts(trainer)
        hist = trainer.train()
        # Inference (threshold) routing of a 21-token sample through the layout (padded to the
        # FP8 / sequence-parallel multiple inside): depth per token, on rank 0.
        depths = (routing_depths(trainer.engine, trainer.depth_maps.ids[:21])
                  if trainer.engine.stage.routed else None)
        pieces = trainer.engine.pieces  # per stage, its chunks' [start, stop)
        stage_tokens = [sum(sum(hist[-1]["layer_tokens"][a:b]) for a, b in mine)
                        for mine in pieces]
        results[kind] = {
            "history": hist, "pieces": pieces, "stage_tokens": stage_tokens,
            "ranges": [mine[0] for mine in pieces] if len(pieces[0]) == 1 else None,
            "layer_costs": [l.cost for l in trainer.engine.plan.layers],
            "shared": shared_copies_identical(trainer),
            "dp": trainer.dims.dp,
            "checkpoints": str(Path(out_dir) / kind / "checkpoints"),  # the final save's root
            "depths": depths,
            **layouts(),
            "wall_s": time.perf_counter() - t0,  # build + train + final save (for the record)
        }
        if GUARD:
            results[kind]["collectives"] = sorted(GUARD.calls - calls_before)
            results[kind]["violations"] = GUARD.violations[violations_before:]
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
