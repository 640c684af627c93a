# shellcheck shell=bash
# Shared by galera-entrypoint, galera-status and galera-healthcheck (sourced, not run).
# Nothing here reads a secret.

DATADIR=/var/lib/mysql
STATE_DIR=/run/galera                 # owned by mysql, 0700; reset at every container start
PHASE_FILE=$STATE_DIR/phase           # what the entrypoint is doing (see galera-healthcheck)
POSITION_FILE=$STATE_DIR/position     # "UUID SEQNO SAFE_TO_BOOTSTRAP" of the local data
ADDRESS_FILE=$STATE_DIR/address       # this node's address on the cluster network
DATA_FILE=$STATE_DIR/data             # "yes" when the datadir holds data, else "no"
PC_FILE=$STATE_DIR/pc                 # "restore" while pc.recovery (gvwstate.dat) may work, else "no"
SST_CNF=$STATE_DIR/sst-auth.cnf       # 0600, wsrep_sst_auth for mariadbd (never on a command line)
STATUS_PORT=${GALERA_STATUS_PORT:-4570}
NO_UUID=00000000-0000-0000-0000-000000000000

log() { printf '%s galera: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

read_file() { cat "$1" 2>/dev/null || true; }

# Run SQL on the local server through its unix socket with socket authentication: root when
# called as root (healthcheck), the mysql account when called as mysql (entrypoint, status).
# No password is involved.
local_sql() {
    timeout 5 mariadb --user="$(id -un)" --batch --skip-column-names --connect-timeout=3 \
        -e "$1" 2>/dev/null
}

# Prints "name value" lines for the wsrep status variables we look at, or fails when the local
# server does not answer.
wsrep_status() {
    local_sql "SELECT LOWER(variable_name), variable_value FROM information_schema.global_status
               WHERE variable_name IN ('wsrep_ready', 'wsrep_cluster_status',
                 'wsrep_local_state_comment', 'wsrep_cluster_state_uuid',
                 'wsrep_last_committed', 'wsrep_cluster_size')"
}

mariadbd_alive() { pgrep -x mariadbd >/dev/null 2>&1; }
