#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/test_slurm.py (run as root; idempotent).
#
#   - installs slurm-wlm, munge and iproute2 from Debian's packages (apt-get update first);
#   - writes its own slurm.conf (never /etc/slurm: a site's configuration stays untouched),
#     $STATE/etc/slurm.conf: this host (real hostname, CPU count, memory) in partition
#     `cpu` (the default), plus simulated H100 nodes `h100-[001-016]` (8 GPUs each, NodeAddr
#     127.0.0.1, never started) in partition `h100`, so `sbatch --test-only` can judge the
#     multi-node scripts;
#   - starts munged, slurmctld and slurmd on that file and waits until `sinfo` shows this host
#     idle; the last line of its output is `SLURM_CONF=<file>`: clients (sbatch, scontrol, srun
#     in the jobs) given that variable talk to this cluster only.
# State, spool, logs and the configuration live under ${MEGAMOR_SLURM_STATE:-/var/tmp/megamor-slurm}.
# Exit 3 (nothing changed): another Slurm controller already listens on this host's ports.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then echo "setup_cluster.sh: must run as root" >&2; exit 2; fi
STATE=${MEGAMOR_SLURM_STATE:-/var/tmp/megamor-slurm}
export DEBIAN_FRONTEND=noninteractive

need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc --all)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$STATE"/{ctld,spool,log,etc} /run/munge /var/log/munge /var/lib/munge /etc/munge
CONF=$STATE/etc/slurm.conf
export SLURM_CONF=$CONF

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running "$STATE/slurmctld.pid" && command -v ss >/dev/null \
    && ss -ltn 2>/dev/null | grep -qE '[:.]6817[[:space:]]'; then
  echo "setup_cluster.sh: port 6817 is taken by a Slurm controller this script did not start;" \
       "not starting a test cluster here (use MEGAMOR_TEST_SLURM_CLUSTER to test against it)" >&2
  exit 3
fi

# munge: a key once, then the daemon.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged --force" || munged --force
  else
    munged --force
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

NEW=$(mktemp)
cat >"$NEW" <<CONF
# Written by megamor tests/slurm/setup_cluster.sh: one real node ($HOST) + simulated H100 nodes.
ClusterName=megamor
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=defer_batch=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
MinJobAge=600
InactiveLimit=0
GresTypes=gpu
# The real node (runs the CPU jobs).
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# Simulated H100 nodes: only for sbatch --test-only (no slurmd ever runs for them).
NodeName=h100-[001-016] NodeAddr=127.0.0.1 Sockets=2 CoresPerSocket=56 ThreadsPerCore=1 RealMemory=2000000 Gres=gpu:h100:8 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=h100 Nodes=h100-[001-016] Default=NO MaxTime=INFINITE State=UP
CONF
# gres.conf for the simulated nodes (they never read it; the controller only needs the count).
printf 'NodeName=h100-[001-016] Name=gpu Type=h100 Count=8\n' > "$STATE/etc/gres.conf"

changed=1
if [ -f "$CONF" ] && cmp -s "$NEW" "$CONF"; then changed=0; fi
mv "$NEW" "$CONF"
chmod 0644 "$CONF"

if [ "$changed" = 1 ]; then
  # A new node set needs a restart (scontrol reconfigure is not enough).
  for pidf in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    if running "$pidf"; then kill "$(cat "$pidf")"; for _ in $(seq 50); do running "$pidf" || break; sleep 0.1; done; fi
  done
fi
running "$STATE/slurmctld.pid" || slurmctld -c -f "$CONF"
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
running "$STATE/slurmd.pid" || slurmd -f "$CONF"
scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true

for _ in $(seq 150); do
  st=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -1)
  case "$st" in
    idle|mix|alloc)
      # The simulated nodes leave the UNKNOWN state shortly after the controller starts.
      for _ in $(seq 100); do
        sinfo -h -p h100 -o '%t' | grep -q unk || break; sleep 0.2
      done
      echo "slurm: $HOST is $st (CPUs=$CPUS)"; sinfo; echo "SLURM_CONF=$CONF"; exit 0 ;;
  esac
  sleep 0.2
done
echo "setup_cluster.sh: $HOST did not become idle; sinfo says:" >&2
sinfo >&2 || true
tail -20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
