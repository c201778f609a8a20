#!/usr/bin/env bash
# Submit a megamor batch script with its #SBATCH headers overridden from the environment:
#   MEGAMOR_NODES, MEGAMOR_NTASKS_PER_NODE, MEGAMOR_GPUS_PER_NODE (0: a CPU job), MEGAMOR_CPUS_PER_TASK,
#   MEGAMOR_PARTITION, MEGAMOR_ACCOUNT, MEGAMOR_QOS, MEGAMOR_TIME, MEGAMOR_SIGNAL_SECONDS,
#   MEGAMOR_LOG (output file pattern), MEGAMOR_SBATCH_ARGS (anything else, word-split).
#   slurm/submit.sh slurm/pretrain_360m.sh [section.option=value ...]
# The other MEGAMOR_* variables (layout, precision, container, modules) are read by the job itself;
# sbatch exports the submitting environment by default.
set -euo pipefail
script=${1:?usage: slurm/submit.sh slurm/pretrain_<size>.sh [overrides ...]}; shift
opts=()
[ -n "${MEGAMOR_NODES:-}" ] && opts+=(--nodes="$MEGAMOR_NODES")
[ -n "${MEGAMOR_NTASKS_PER_NODE:-}" ] && opts+=(--ntasks-per-node="$MEGAMOR_NTASKS_PER_NODE")
if [ -n "${MEGAMOR_GPUS_PER_NODE:-}" ]; then
  opts+=(--gpus-per-node="$MEGAMOR_GPUS_PER_NODE")
  # A CPU job: no exclusive node, one task per requested rank.
  [ "$MEGAMOR_GPUS_PER_NODE" = 0 ] && opts+=(--oversubscribe --mem=0)
fi
[ -n "${MEGAMOR_CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task="$MEGAMOR_CPUS_PER_TASK")
[ -n "${MEGAMOR_PARTITION:-}" ] && opts+=(--partition="$MEGAMOR_PARTITION")
[ -n "${MEGAMOR_ACCOUNT:-}" ] && opts+=(--account="$MEGAMOR_ACCOUNT")
[ -n "${MEGAMOR_QOS:-}" ] && opts+=(--qos="$MEGAMOR_QOS")
[ -n "${MEGAMOR_TIME:-}" ] && opts+=(--time="$MEGAMOR_TIME")
[ -n "${MEGAMOR_SIGNAL_SECONDS:-}" ] && opts+=(--signal="B:USR1@$MEGAMOR_SIGNAL_SECONDS")
if [ -n "${MEGAMOR_LOG:-}" ]; then
  opts+=(--output="$MEGAMOR_LOG" --error="$MEGAMOR_LOG")
  mkdir -p "$(dirname "$MEGAMOR_LOG")"
else
  mkdir -p logs
fi
# shellcheck disable=SC2206
[ -n "${MEGAMOR_SBATCH_ARGS:-}" ] && opts+=($MEGAMOR_SBATCH_ARGS)
exec sbatch "${opts[@]}" "$script" "$@"
