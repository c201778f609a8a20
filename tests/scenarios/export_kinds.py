"""Multi-rank scenario: train several model kinds for a few steps, each on its own parallel
layout and run directory, and save a sharded checkpoint of each (for the export tests).

    torchrun --nproc-per-node=4 export_kinds.py --root DIR --kinds a:LAYOUT,b:LAYOUT [overrides]

LAYOUT is tp2pp2 or tp2dp2. Writes DIR/<kind>/checkpoints/step_N.
"""

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megamor import parallel  # noqa: E402
from megamor.config import load_config  # noqa: E402
from megamor.training.loop import Trainer  # noqa: E402
from train_kinds import KINDS  # noqa: E402

EXTRA_KINDS = {
    "mor_tc_free_kvshare": ["model.arch=mor", "routing.type=token_choice", "model.kv_sharing=true",
                            "routing.balancing=loss_free", "routing.bias_update_rate=0.01"],
    "recursive_kvshare": ["model.arch=recursive", "model.kv_sharing=true"],
}
LAYOUTS = {
    "tp2pp2": ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
    "tp2dp2": ["parallel.tensor_model_parallel_size=2"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--kinds", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    for item in args.kinds.split(","):
        kind, layout = item.split(":")
        spec = {**KINDS, **EXTRA_KINDS}[kind]
        cfg = load_config(None, ["model.preset=tiny", "model.seq_length=64", "train.warmup_steps=1",
                                 "train.lr_schedule=constant", "train.lr=0.003",
                                 "tracking.enabled=false", *spec, *LAYOUTS[layout],
                                 f"run.output_dir={Path(args.root) / kind}", *args.overrides])
        Trainer(cfg).train()  # saves a checkpoint at the end
    parallel.shutdown()


if __name__ == "__main__":
    main()
