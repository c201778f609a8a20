#!/usr/bin/env bash
# megamor: pretrain the 1p7b MoR model on H100 nodes (8 GPUs each).
#   sbatch slurm/pretrain_1p7b.sh [section.option=value ...]        (from the megamor checkout)
#   slurm/submit.sh slurm/pretrain_1p7b.sh [...]                    (MEGAMOR_* overrides the headers)
# Layout: 8 node(s) x 8 GPUs = 64 ranks, tp 2 x pp 1 -> dp 32; fp8; micro-batch 4, global batch 256
#   sequences of 2048 tokens (~0.5M tokens per step).
# Why (`megamor plan --preset 1p7b --nodes 8`, docs/performance.md): everything fits at pp 1
# (10.8 GiB predicted per GPU at micro-batch 4), and a pipeline adds a bubble and copies of the
# shared block. tp 2 inside a node (NVLink) halves the parameters per rank, and with them the
# data-parallel gradient sync the trainer does not overlap: 0.193 s predicted per step against
# 0.238 s at tp 1; tp 4 is within 1% (the planner's first) with half-size GEMM shards. tp 2 does
# not halve activations (the norms' 4h per token stay whole: 0.6x); sequence parallelism would
# split them too (parallel.sequence_parallel=true: 8.5 -> 7.3 GiB) but is off: memory does not
# bind here (docs/cluster.md). Micro-batch 4: the planner's step time does not depend on it; it
# fits with 6x headroom.
# FP8: hidden 2048 / ffn 8192 GEMMs gain most from FP8 tensor cores; fp32 master weights.
# Every #SBATCH line can be overridden on the sbatch command line (or by slurm/submit.sh from
# MEGAMOR_NODES, MEGAMOR_PARTITION, MEGAMOR_TIME, ...); everything below from MEGAMOR_* variables
# (docs/cluster.md).
#SBATCH --job-name=megamor-1p7b
#SBATCH --nodes=8
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

MEGAMOR_PRESET=${MEGAMOR_PRESET:-1p7b}
DEFAULT_TP=2
DEFAULT_PP=1
DEFAULT_PRECISION=fp8
DEFAULT_MBS=4
DEFAULT_GBS=256

for _c in "${MEGAMOR_HOME:-}" "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  if [ -n "$_c" ] && [ -f "$_c/slurm/common.sh" ]; then . "$_c/slurm/common.sh"; break; fi
done
type megamor_batch >/dev/null 2>&1 || { echo "megamor: slurm/common.sh not found; set MEGAMOR_HOME" >&2; exit 2; }
megamor_batch "$@"
