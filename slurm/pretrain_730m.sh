#!/usr/bin/env bash
# megamor: pretrain the 730m MoR model on H100 nodes (8 GPUs each).
#   sbatch slurm/pretrain_730m.sh [section.option=value ...]        (from the megamor checkout)
#   slurm/submit.sh slurm/pretrain_730m.sh [...]                    (MEGAMOR_* overrides the headers)
# Layout: 4 node(s) x 8 GPUs = 32 ranks, tp 1 x pp 1 -> dp 32; fp8; micro-batch 4, global batch 256
#   sequences of 2048 tokens (~0.5M tokens per step).
# Why (`megamor plan --preset 730m --nodes 4`, docs/performance.md): everything fits one H100 at
# pp 1 (11.3 GiB predicted at micro-batch 4), and the data-parallel gradient sync is overlapped
# with the backward and forward (parallel.overlap_grad_reduce / overlap_param_gather, on by
# default on GPUs), so pure data parallel is fastest: 0.110 s predicted per step against 0.130 s
# at tp 2 (the default while the sync was not overlapped). FP8 (Transformer Engine, delayed scaling):
# hidden 1536 / ffn 4096 GEMMs are large enough for H100 FP8 tensor cores to give a real
# speed-up; master weights and the optimizer stay in fp32, so the loss tracks bf16.
# Every #SBATCH line can be overridden on the sbatch command line (or by slurm/submit.sh from
# MEGAMOR_NODES, MEGAMOR_PARTITION, MEGAMOR_TIME, ...); everything below from MEGAMOR_* variables
# (docs/cluster.md).
#SBATCH --job-name=megamor-730m
#SBATCH --nodes=4
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

MEGAMOR_PRESET=${MEGAMOR_PRESET:-730m}
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
