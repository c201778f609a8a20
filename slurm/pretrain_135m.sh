#!/usr/bin/env bash
# megamor: pretrain the 135m MoR model on H100 nodes (8 GPUs each).
#   sbatch slurm/pretrain_135m.sh [section.option=value ...]        (from the megamor checkout)
#   slurm/submit.sh slurm/pretrain_135m.sh [...]                    (MEGAMOR_* overrides the headers)
# Layout: 1 node(s) x 8 GPUs = 8 ranks, tp 1 x pp 1 -> dp 8; bf16; micro-batch 8, global batch 256
#   sequences of 2048 tokens (~0.5M tokens per step).
# Why: 9 heads / 3 KV groups only split by tp 3 (not a divisor of 8 GPUs), and 135M parameters
# with their Adam state fit one GPU many times over: pure data parallel, no tp/pp bubbles, the
# planner's first (`megamor plan --preset 135m`: 0.093 s per step, 12.3 GiB at micro-batch 8).
# bf16, not FP8: at hidden 576 the GEMMs are too small for FP8 to win over its casts and
# scaling bookkeeping, and the small model is the most sensitive to FP8 noise.
# Every #SBATCH line can be overridden on the sbatch command line (or by slurm/submit.sh from
# MEGAMOR_NODES, MEGAMOR_PARTITION, MEGAMOR_TIME, ...); everything below from MEGAMOR_* variables
# (docs/cluster.md).
#SBATCH --job-name=megamor-135m
#SBATCH --nodes=1
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

MEGAMOR_PRESET=${MEGAMOR_PRESET:-135m}
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
