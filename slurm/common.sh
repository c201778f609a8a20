# megamor Slurm helper: what the pretrain_*.sh batch scripts have in common. Sourced, not run.
#
# The script sets MEGAMOR_PRESET and its defaults (DEFAULT_TP, DEFAULT_PP, DEFAULT_PRECISION,
# DEFAULT_MBS, DEFAULT_GBS) and calls `megamor_batch "$@"`, which:
#   1. loads modules / a virtualenv, sets NCCL and threading variables (all overridable);
#   2. runs the preflight (`python -m megamor.launch.slurm --check`): node list, rendezvous address,
#      config and parallel layout against nodes x tasks per node; a failure exits 2, no srun;
#   3. starts one `srun` (optionally in a pyxis/enroot container) running
#      `python -m megamor.launch.slurm -- pretrain --resume auto ...` per task;
#   4. forwards USR1/TERM from the batch shell (`--signal=B:USR1@N`, `scancel --signal=USR1
#      --batch`) to the srun step, whose tasks save a checkpoint and exit 75 (megatron's
#      checkpoint helper processes ignore the signal; megamor/lifecycle.py);
#   5. on exit 75 (or a fresh preempted.json) runs `scontrol requeue $SLURM_JOB_ID`: the job
#      queues again and the next run resumes from the newest checkpoint;
#   6. on a stalled rank (the node's hang watchdog wrote a fresh hung.json, megamor/watchdog.py)
#      exits 76 and requeues the same way, unless the job hung MEGAMOR_HANG_REQUEUES times in a
#      row without a new checkpoint.
# The output directory is runs/<job name> (MEGAMOR_OUTPUT_DIR, or MEGAMOR_OUTPUT_PER_JOB=1 for
# runs/<job name>-<job id>): a new sbatch of the same script resumes too. A job refuses a
# directory that another running job uses (recorded in <dir>/.slurm_job).
# Environment overrides (MEGAMOR_*) are listed in docs/cluster.md.

megamor_log() { echo "[megamor $(date -u +%H:%M:%S)] $*"; }

megamor_find_home() {
  local c
  for c in "${MEGAMOR_HOME:-}" "${SLURM_SUBMIT_DIR:-}" "${SLURM_SUBMIT_DIR:-.}/.." "$PWD"; do
    if [ -n "$c" ] && [ -f "$c/launch/slurm.py" ]; then (cd "$c" && pwd); return 0; fi
  done
  echo "megamor: cannot find the megamor checkout; set MEGAMOR_HOME (or submit from it)" >&2
  return 1
}

megamor_batch() {
  set -u
  MEGAMOR_HOME=$(megamor_find_home) || exit 2
  cd "$MEGAMOR_HOME"

  # --- software: modules, virtualenv -------------------------------------------------------
  if [ -n "${MEGAMOR_MODULES:-}" ]; then
    if ! type module >/dev/null 2>&1; then
      [ -f /etc/profile.d/modules.sh ] && . /etc/profile.d/modules.sh
      [ -f /etc/profile.d/lmod.sh ] && . /etc/profile.d/lmod.sh
    fi
    # shellcheck disable=SC2086
    module load $MEGAMOR_MODULES || { echo "megamor: module load $MEGAMOR_MODULES failed" >&2; exit 2; }
  fi
  if [ -n "${MEGAMOR_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$MEGAMOR_VENV/bin/activate" || { echo "megamor: cannot activate $MEGAMOR_VENV" >&2; exit 2; }
  fi
  local py=${MEGAMOR_PYTHON:-python3}

  # --- allocation -> layout ---------------------------------------------------------------
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local gpn=${MEGAMOR_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  local tpn=${MEGAMOR_NTASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$gpn}}
  [ "$tpn" -ge 1 ] 2>/dev/null || tpn=1
  local ntasks=${MEGAMOR_NTASKS:-${SLURM_NTASKS:-$((nodes * tpn))}}
  local tp=${MEGAMOR_TP:-$DEFAULT_TP} pp=${MEGAMOR_PP:-$DEFAULT_PP}
  local precision=${MEGAMOR_PRECISION:-$DEFAULT_PRECISION}
  local device=cuda backend=${MEGAMOR_BACKEND:-auto}
  if [ "$gpn" = 0 ]; then  # CPU allocation: gloo, fp32, megatron's local layers
    device=cpu; precision=${MEGAMOR_PRECISION:-fp32}; backend=${MEGAMOR_BACKEND:-local}
  fi
  # Training engine: megatron (default) | deepspeed (ZeRO over data parallel, no pipeline:
  # pp 1 and bf16 unless set explicitly, since FP8 is the megatron engine's).
  local engine=${MEGAMOR_ENGINE:-megatron}
  local engine_args=("parallel.engine=$engine")
  if [ "$engine" = deepspeed ]; then
    pp=${MEGAMOR_PP:-1}
    [ -z "${MEGAMOR_PRECISION:-}" ] && [ "$precision" = fp8 ] && precision=bf16
    engine_args+=("parallel.zero_stage=${MEGAMOR_ZERO_STAGE:-2}")
    [ -n "${MEGAMOR_OFFLOAD:-}" ] && engine_args+=("parallel.offload_optimizer=$MEGAMOR_OFFLOAD")
  fi
  local out=${MEGAMOR_OUTPUT_DIR:-$MEGAMOR_HOME/runs/${SLURM_JOB_NAME:-megamor}}
  if [ -z "${MEGAMOR_OUTPUT_DIR:-}" ] && [ "${MEGAMOR_OUTPUT_PER_JOB:-0}" = 1 ]; then
    out=$out-${SLURM_JOB_ID:-0}
  fi

  # --- environment: NCCL, threads ----------------------------------------------------------
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  if [ "$device" = cuda ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP overlap
    # TORCH_NCCL_* (async error handling, heartbeat, flight recorder) are set by each rank from
    # run.hang_timeout, above its collective timeout (megamor/watchdog.py, docs/cluster.md).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}
    # NCCL_SOCKET_IFNAME / NCCL_IB_HCA: set them in the environment when the default
    # interface choice is wrong on your fabric; they pass through srun unchanged. gloo's side
    # (object collectives, megatron's gloo groups) uses GLOO_SOCKET_IFNAME, which megamor's
    # launcher sets from NCCL_SOCKET_IFNAME when unset (launch/network.py).
  fi

  local args=(pretrain --resume auto "model.preset=$MEGAMOR_PRESET"
              "parallel.tensor_model_parallel_size=$tp" "parallel.pipeline_model_parallel_size=$pp"
              "train.device=$device" "train.precision=$precision" "model.backend=$backend"
              "train.micro_batch_size=${MEGAMOR_MBS:-$DEFAULT_MBS}"
              "train.global_batch_size=${MEGAMOR_GBS:-$DEFAULT_GBS}"
              "run.output_dir=$out" "${engine_args[@]}")
  [ -n "${MEGAMOR_CONFIG:-}" ] && args=(pretrain --config "$MEGAMOR_CONFIG" "${args[@]:1}")
  args+=("$@")  # the user's overrides win

  megamor_log "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $tpn task(s), preset $MEGAMOR_PRESET, engine $engine, tp $tp pp $pp, $device/$precision, output $out"

  # --- one job per output directory ---------------------------------------------------------
  local owner
  owner=$(cat "$out/.slurm_job" 2>/dev/null || true)
  if [ -n "$owner" ] && [ "$owner" != "${SLURM_JOB_ID:-}" ] \
      && squeue -h -j "$owner" -o %i 2>/dev/null | grep -qx "$owner"; then
    megamor_log "job $owner (queued or running) uses $out; set MEGAMOR_OUTPUT_DIR (or --job-name, or MEGAMOR_OUTPUT_PER_JOB=1) for this one"
    exit 2
  fi

  # --- preflight: one clear error before any rank starts -----------------------------------
  # On GPUs the data must be named (data.path=builtin for a smoke run on the demo corpus); the
  # preflight also prints the addresses gloo and NCCL use on this node.
  local check=(--check --world-size "$ntasks")
  [ "$device" = cuda ] && check+=(--require-data)
  MEGAMOR_WORLD_SIZE=$ntasks "$py" -m megamor.launch.slurm "${check[@]}" -- "${args[@]}" \
    || { megamor_log "preflight failed; not starting srun"; exit 2; }

  # Tasks exit together (training and a signal checkpoint end in collectives); a task that
  # dies leaves the others at most MEGAMOR_SRUN_WAIT seconds (`--wait`) before srun ends them,
  # so a crashed rank ends the job instead of leaving it hanging until the NCCL/gloo timeout.
  # Not --kill-on-bad-exit: exit 75 after a signal checkpoint counts as "bad" and would kill
  # rank 0 while it still finishes the MLflow run.
  local srun_opts=(--ntasks="$ntasks" --ntasks-per-node="$tpn" --kill-on-bad-exit=0
                   --wait="${MEGAMOR_SRUN_WAIT:-60}")
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  if [ -n "${MEGAMOR_CONTAINER_IMAGE:-}" ]; then  # pyxis / enroot
    srun_opts+=(--container-image="$MEGAMOR_CONTAINER_IMAGE"
                --container-mounts="${MEGAMOR_CONTAINER_MOUNTS:-$MEGAMOR_HOME:$MEGAMOR_HOME}"
                --container-workdir="$MEGAMOR_HOME")
  fi
  # shellcheck disable=SC2206
  [ -n "${MEGAMOR_SRUN_ARGS:-}" ] && srun_opts+=($MEGAMOR_SRUN_ARGS)
  if [ "${MEGAMOR_DRY_RUN:-0}" = 1 ]; then
    echo "srun ${srun_opts[*]} $py -m megamor.launch.slurm -- ${args[*]}"
    return 0
  fi

  # --- run, forward signals, requeue on a signal checkpoint --------------------------------
  mkdir -p "$out" && echo "${SLURM_JOB_ID:-}" > "$out/.slurm_job"
  local stamp; stamp=$(mktemp "${TMPDIR:-/tmp}/megamor-start.XXXXXX")
  MEGAMOR_GOT_TERM=0 MEGAMOR_GOT_USR1=0
  srun "${srun_opts[@]}" "$py" -m megamor.launch.slurm -- "${args[@]}" &
  MEGAMOR_SRUN_PID=$!
  trap 'MEGAMOR_GOT_USR1=1; megamor_log "USR1: asking the ranks to checkpoint"; kill -USR1 $MEGAMOR_SRUN_PID 2>/dev/null' USR1
  trap 'MEGAMOR_GOT_TERM=1; megamor_log "TERM: asking the ranks to checkpoint"; kill -TERM $MEGAMOR_SRUN_PID 2>/dev/null' TERM
  local rc
  local again
  while :; do
    wait "$MEGAMOR_SRUN_PID"; rc=$?
    # > 128: a trapped signal interrupted `wait`; keep waiting while srun runs.
    if [ "$rc" -gt 128 ] && kill -0 "$MEGAMOR_SRUN_PID" 2>/dev/null; then continue; fi
    if [ "$rc" -gt 128 ]; then
      wait "$MEGAMOR_SRUN_PID" 2>/dev/null; again=$?
      [ "$again" != 127 ] && rc=$again
    fi
    break
  done
  trap - USR1 TERM
  if [ "$rc" != 75 ] && [ "$out/preempted.json" -nt "$stamp" ]; then rc=75; fi
  # A stalled rank: the hang watchdog printed its line, wrote the stacks and hung.json, and
  # killed the ranks (srun then reports them killed).
  if [ "$rc" != 75 ] && [ "$out/hung.json" -nt "$stamp" ]; then rc=76; fi
  if [ "$rc" != 0 ] && [ "$rc" != 75 ] && [ "$MEGAMOR_GOT_USR1" = 1 ] && [ "$rc" -gt 128 ]; then
    # USR1 arrived before the ranks installed their handler (start-up): no new checkpoint,
    # but the job was still asked to make room; requeue and resume from the last one.
    megamor_log "srun ended by the signal ($rc) before a checkpoint; requeueing anyway"
    rc=75
  fi
  rm -f "$stamp"
  megamor_log "srun exited with $rc"
  if [ -f "$out/checkpoints/latest" ]; then
    megamor_log "latest checkpoint: $out/checkpoints/$(cat "$out/checkpoints/latest")"
  fi
  if [ "$rc" = 75 ]; then
    if [ "$MEGAMOR_GOT_TERM" = 1 ] || [ "${MEGAMOR_REQUEUE:-1}" = 0 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
      megamor_log "checkpoint saved; not requeueing (resume with --resume auto)"
      exit 75
    fi
    megamor_log "checkpoint saved on a signal: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { megamor_log "requeue failed"; exit 75; }
    exit 75
  fi
  if [ "$rc" = 76 ]; then
    # Requeue a stall, but not forever: count the stalls that found the same latest checkpoint.
    local latest prev="" count=0
    latest=$(cat "$out/checkpoints/latest" 2>/dev/null || echo none)
    [ -f "$out/.hang_requeues" ] && read -r prev count < "$out/.hang_requeues"
    if [ "$prev" = "$latest" ]; then count=$((count + 1)); else count=1; fi
    echo "$latest $count" > "$out/.hang_requeues"
    if [ "${MEGAMOR_REQUEUE:-1}" = 0 ] || [ -z "${SLURM_JOB_ID:-}" ]; then
      megamor_log "a rank stalled (see $out/hung.json); not requeueing (resume with --resume auto)"
      exit 76
    fi
    if [ "$count" -gt "${MEGAMOR_HANG_REQUEUES:-3}" ]; then
      megamor_log "a rank stalled $count times in a row at checkpoint $latest; not requeueing (MEGAMOR_HANG_REQUEUES=${MEGAMOR_HANG_REQUEUES:-3}; see $out/logs/hangs.jsonl)"
      exit 76
    fi
    megamor_log "a rank stalled (stall $count at checkpoint $latest): scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { megamor_log "requeue failed"; exit 76; }
    exit 76
  fi
  exit "$rc"
}
