#!/usr/bin/env bash
# megamor: pretrain the 360m MoR model on H100 nodes (8 GPUs each).
#   sbatch slurm/pretrain_360m.sh [section.option=value ...]        (from the megamor checkout)
#   slurm/submit.sh slurm/pretrain_360m.sh [...]                    (MEGAMOR_* overrides the headers)
# Layout: 2 node(s) x 8 GPUs = 16 ranks, tp 1 x pp 1 -> dp 16; bf16; micro-batch 8, global batch 256
#   sequences of 2048 tokens (~0.5M tokens per step).
# Why: 15 heads / 5 KV groups have no divisor of 8 above 1 (tp 5 would straddle nodes);
# 360M parameters fit one GPU: pure data parallel over 2 nodes, the planner's first (`megamor
# plan --preset 360m --nodes 2`: 0.131 s per step, 16.8 GiB at micro-batch 8; docs/
# performance.md). bf16: hidden 960 is still too
# narrow for FP8 GEMMs to pay for their scaling overhead.
# Every #SBATCH line can be overridden on the sbatch command line (or by slurm/submit.sh from
# MEGAMOR_NODES, MEGAMOR_PARTITION, MEGAMOR_TIME, ...); everything below from MEGAMOR_* variables
# (docs/cluster.md).
#SBATCH --job-name=megamor-360m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out

MEGAMOR_PRESET=${MEGAMOR_PRESET:-360m}
DEFAULT_TP=1
DEFAULT_PP=1
DEFAULT_PRECISION=bf16
DEFAULT_MBS=8
DEFAULT_GBS=256

for _c in "${MEGAMOR_HOME:-}" "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  if [ -n "$_c" ] && [ -f "$_c/slurm/common.sh" ]; then . "$_c/slurm/common.sh"; break; fi
done
type megamor_batch >/dev/null 2>&1 || { echo "megamor: slurm/common.sh not found; set MEGAMOR_HOME" >&2; exit 2; }
megamor_batch "$@"
