"""Multi-rank scenario: train several model kinds for a few steps in one launch of the ranks.

Run under torchrun (or alone, as the single-process reference). Rank 0 writes a JSON file with,
per kind: the losses and router statistics of every step, the tokens each unrolled layer
processed, per-stage token totals, and whether every copy of every shared weight is identical.
"""

import argparse
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megamor import parallel
from megamor.config import load_config
from megamor.training.loop import Trainer

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kinds", default="vanilla,recursive,mor_ec,mor_tc")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = {}
    for kind in args.kinds.split(","):
        cfg = load_config(None, ["model.preset=tiny", "model.seq_length=64", "train.warmup_steps=1",
                                 "train.lr_schedule=constant", "train.lr=0.003",
                                 *KINDS[kind], *args.overrides])
        cfg.run.output_dir = f"{cfg.run.output_dir}/{kind}"  # one run (checkpoint lineage) each
        trainer = Trainer(cfg)
        hist = trainer.train()
        stage_tokens = [sum(hist[-1]["layer_tokens"][a:b]) for a, b in trainer.engine.ranges]
        results[kind] = {
            "history": hist, "ranges": trainer.engine.ranges, "stage_tokens": stage_tokens,
            "layer_costs": [l.cost for l in trainer.engine.plan.layers],
            "shared": shared_copies_identical(trainer),
            "dp": trainer.dims.dp,
        }
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
