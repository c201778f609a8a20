#!/usr/bin/env bash
# megamor: pretrain the 1p7b MoR model on H100 nodes (8 GPUs each).
#   sbatch slurm/pretrain_1p7b.sh [section.option=value ...]        (from the megamor checkout)
#   slurm/submit.sh slurm/pretrain_1p7b.sh [...]                    (MEGAMOR_* overrides the headers)
# Layout: 8 node(s) x 8 GPUs = 64 ranks, tp 1 x pp 1 -> dp 64; fp8; micro-batch 4, global batch 256
#   sequences of 2048 tokens (~0.5M tokens per step).
# Why (`megamor plan --preset 1p7b --nodes 8`, docs/performance.md): everything fits at pp 1
# (19.0 GiB predicted per GPU at micro-batch 4), and a pipeline adds a bubble and copies of the
# shared block. The data-parallel gradient sync is overlapped with the backward and forward
# (parallel.overlap_grad_reduce / overlap_param_gather, on by default on GPUs), so pure data
# parallel is fastest: 0.133 s predicted per step (51% MFU) against 0.143 s at tp 2, the default
# while the sync was not overlapped (then 0.193 s). Sequence parallelism needs tp > 1; memory
# does not bind here (docs/cluster.md). Micro-batch 4: it fits with 3x headroom.
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
DEFAULT_TP=1
DEFAULT_PP=1
DEFAULT_PRECISION=fp8
DEFAULT_MBS=4
DEFAULT_GBS=256

for _c in "${MEGAMOR_HOME:-}" "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
  if [ -n "$_c" ] && [ -f "$_c/slurm/common.sh" ]; then . "$_c/slurm/common.sh"; break; fi
done
type megamor_batch >/dev/null 2>&1 || { echo "megamor: slurm/common.sh not found; set MEGAMOR_HOME" >&2; exit 2; }
megamor_batch "$@"
