#!/usr/bin/env bash
# Start a 2-node Slurm on this machine for the integration tests of the slurm executor: munge,
# slurmctld, and two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`) that Slurm sees as two nodes
# of one partition, both on this host (each on its own port, spool, log and pid file). A job
# with --nodes=2 gets one task on each. Needs root and Debian's packages; idempotent: does
# nothing when both nodes already answer. Prints the partition on success.
set -euo pipefail

if ! command -v slurmctld >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
fi
# node names resolve, as on a cluster (the training's rendezvous address is its first node's name)
for node in n1 n2; do
  getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
done
nodes_up() {  # both daemons run here and the controller sees both nodes up
  pgrep -f 'slurmd -N n1' >/dev/null && pgrep -f 'slurmd -N n2' >/dev/null &&
    [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|alloc)')" = 2 ]
}
if nodes_up; then
  sinfo -h -o "slurm: partition %P, nodes %N, %T"; exit 0
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(free -m | awk '/^Mem:/{print int($2 * 0.8)}')
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd-n1 /var/spool/slurmd-n2 /var/log/slurm /run/munge /var/lib/munge /var/log/munge
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=mcl
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6818 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=6819 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged || munged --force
# daemons of an earlier configuration (e.g. a single-node one) do not pick up new nodes: restart
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
for _ in $(seq 20); do pgrep -x 'slurmctld|slurmd' >/dev/null || break; sleep 0.5; done
slurmctld
for node in n1 n2; do slurmd -N "$node"; done
for _ in $(seq 60); do
  if nodes_up; then
    sinfo -h -o "slurm: partition %P, nodes %N, %T"; exit 0
  fi
  sleep 1
done
echo "slurm_local.sh: the nodes did not come up; see /var/log/slurm/" >&2
tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n1.log /var/log/slurm/slurmd-n2.log >&2 || true
exit 1
