#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, with accounting, for the tests and for trying the cluster path:
#
#   scripts/slurm_local.sh start    # install (Debian packages, skipped when present), configure, start; waits until a job can run
#   scripts/slurm_local.sh status   # daemons, node state, whether sacct answers
#   scripts/slurm_local.sh stop     # stop the daemons this script started (by their pid files)
#
# Daemons: munged, MariaDB (own data folder and port), slurmdbd, slurmctld, slurmd. proctrack/linuxproc,
# task/none, no cgroups; the node has CPUs = nproc and the machine's memory. Accounting is real
# (slurmdbd + MariaDB) because without it `sacct` fails, and submitit then never learns that a job was
# cancelled, timed out or killed before it wrote its result: the sweep would wait forever.
#
# Everything lives under $SLURM_LOCAL_DIR (default /var/tmp/moewm-slurm): state, spool, logs, database.
# The config goes to /etc/slurm/slurm.conf (where every SLURM command looks); a slurm.conf this script
# did not write is never overwritten. Needs root (or sudo) for apt-get and the daemons.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/tmp/moewm-slurm}
DB_PORT=${SLURM_LOCAL_DB_PORT:-6820}           # not 3306: a MariaDB of the machine's own may be there
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by moewm scripts/slurm_local.sh"
CLUSTER=moewm
PARTITION=local
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "slurm_local.sh: needs root or sudo (apt-get, daemons)" >&2; exit 2; }
    SUDO="sudo"
fi

say() { echo "slurm_local: $*"; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until the command succeeds
    local limit=$1 what=$2; shift 2
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - t0 >= limit )); then
            echo "slurm_local: $what not ready after ${limit}s; logs in $DIR/log" >&2
            tail -n 20 "$DIR"/log/*.log >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.2
    done
}

alive() { [ -f "$1" ] && $SUDO kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    say "installing ${missing[*]}"
    $SUDO apt-get update -qq
    # policy-rc.d: the packages must not start their own daemons (we start ours, with our config)
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d.moewm >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d.moewm
    local had_policy=0
    [ -e /usr/sbin/policy-rc.d ] && had_policy=1
    [ $had_policy = 1 ] || $SUDO cp /usr/sbin/policy-rc.d.moewm /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    [ $had_policy = 1 ] || $SUDO rm -f /usr/sbin/policy-rc.d
    $SUDO rm -f /usr/sbin/policy-rc.d.moewm
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "slurm_local: $CONF exists and was not written by this script; not touching it" >&2
        exit 2
    fi
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)  # slurmd drains a node that has less than it claims
    $SUDO mkdir -p "$DIR"/{state,spool,log,run} /etc/slurm
    $SUDO tee "$CONF" >/dev/null <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    $SUDO tee "$DBD_CONF" >/dev/null <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=moewm-local-slurm
StorageLoc=slurm_acct_db
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
    $SUDO chmod 600 "$DBD_CONF"
}

start_munge() {
    if $SUDO munge -n 2>/dev/null | $SUDO unmunge >/dev/null 2>&1; then
        return  # a munged is already answering (ours or the machine's)
    fi
    [ -s /etc/munge/munge.key ] || $SUDO mungekey --create >/dev/null 2>&1 || $SUDO /usr/sbin/create-munge-key -f >/dev/null
    $SUDO mkdir -p /run/munge && $SUDO chown munge:munge /run/munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
    $SUDO runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /dev/null "$DIR/run/munged.ours" 2>/dev/null || $SUDO touch "$DIR/run/munged.ours"
    wait_for 10 munged bash -c "$SUDO munge -n | $SUDO unmunge"
}

start_mariadb() {
    local data=$DIR/mysql
    alive "$DIR/run/mysqld/mariadb.pid" && return
    if [ ! -d "$data/mysql" ]; then
        $SUDO mkdir -p "$data" && $SUDO chown mysql:mysql "$data"
        $SUDO mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
    fi
    $SUDO mkdir -p "$DIR/run/mysqld" && $SUDO chown mysql:mysql "$DIR/run/mysqld"  # mariadbd runs as mysql: its pid and log go here
    $SUDO ln -sf "$DIR/run/mysqld/mariadb.log" "$DIR/log/mariadb.log"
    $SUDO bash -c "nohup mariadbd --user=mysql --datadir='$data' --port=$DB_PORT --bind-address=127.0.0.1 \
        --socket='$DIR/run/mysqld/mysqld.sock' --pid-file='$DIR/run/mysqld/mariadb.pid' --skip-log-bin \
        --innodb-buffer-pool-size=64M --log-error='$DIR/run/mysqld/mariadb.log' >/dev/null 2>&1 &"
    wait_for 60 MariaDB $SUDO mariadb-admin --socket="$DIR/run/mysqld/mysqld.sock" ping
    $SUDO mariadb --socket="$DIR/run/mysqld/mysqld.sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'moewm-local-slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'moewm-local-slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start() {
    local t0=$SECONDS
    install_packages
    local t_install=$((SECONDS - t0))
    write_config
    start_munge
    start_mariadb
    alive "$DIR/run/slurmdbd.pid" || $SUDO slurmdbd
    wait_for 60 slurmdbd $SUDO sacctmgr -n show cluster
    # the cluster must be known to the database before slurmctld registers, or sacct lists nothing
    $SUDO sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" || $SUDO sacctmgr -i add cluster "$CLUSTER" >/dev/null
    alive "$DIR/run/slurmctld.pid" || $SUDO slurmctld
    wait_for 30 slurmctld scontrol ping
    alive "$DIR/run/slurmd.pid" || $SUDO slurmd
    wait_for 60 "node $(hostname -s)" bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
    wait_for 30 sacct sacct -n -X -S now
    say "up in $((SECONDS - t0)) s (install ${t_install} s): partition $PARTITION, $(nproc) CPUs; logs in $DIR/log"
}

stop() {
    local name
    for name in slurmd slurmctld slurmdbd mysqld/mariadb; do
        if alive "$DIR/run/$name.pid"; then
            $SUDO kill "$(cat "$DIR/run/$name.pid")" || true
        fi
    done
    for name in slurmd slurmctld slurmdbd mysqld/mariadb; do
        local t0=$SECONDS
        while alive "$DIR/run/$name.pid" && (( SECONDS - t0 < 30 )); do sleep 0.2; done
    done
    if [ -f "$DIR/run/munged.ours" ] && alive /run/munge/munged.pid; then
        $SUDO kill "$(cat /run/munge/munged.pid)" || true
        $SUDO rm -f "$DIR/run/munged.ours"
    fi
    say "stopped"
}

status() {
    local name rc=0
    for name in slurmd slurmctld slurmdbd mysqld/mariadb; do
        if alive "$DIR/run/$name.pid"; then echo "${name#*/}: running (pid $(cat "$DIR/run/$name.pid"))"; else echo "${name#*/}: not running"; rc=1; fi
    done
    sinfo -N -o "%N %T %c %m" 2>/dev/null || rc=1
    if sacct -n -X -S now >/dev/null 2>&1; then echo "sacct: answers"; else echo "sacct: fails (no accounting)"; rc=1; fi
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
