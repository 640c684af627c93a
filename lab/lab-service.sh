#!/bin/bash
# lab-service NAME start|stop|restart|status
#
# The systemctl stand-in of a haswarm lab node (the nodes have no systemd). Installed at
# /usr/local/sbin/lab-service in every node by lab/node-init.sh, which also starts the services
# with it at boot. haswarm's config/lab.yml restarts Avahi with it from cron
# (mdns.restart_command), and steps that would run `systemctl restart docker` on a Pi run
# `lab-service docker restart` here.
#
# NAME: sshd docker glusterd avahi-daemon cron dbus
# Exit status as `systemctl`: 0 done / running, 3 for `status` of a stopped service, 1 failure,
# 2 usage. `start` of a running service and `stop` of a stopped one succeed and say so.
# Daemons are started with the lock fd closed (it serializes lab-service calls per service).
# `start` returns once the service answers (docker: its API socket, glusterd: port 24007), like
# a systemd unit that is "active". Logs: /var/log/haswarm-lab/NAME.log (glusterd: its own
# /var/log/glusterfs/glusterd.log).
# As `systemctl stop glusterd` on Debian, stopping glusterd leaves the brick processes running.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -r /run/haswarm-lab/node.env ] && . /run/haswarm-lab/node.env
LOGDIR=/var/log/haswarm-lab
SERVICES="sshd docker glusterd avahi-daemon cron dbus"

usage() { echo "usage: lab-service {${SERVICES// /|}} {start|stop|restart|status}" >&2; exit 2; }
[ $# -eq 2 ] || usage
svc=$1 action=$2

case $svc in
    sshd)         pidfile=/run/sshd.pid;          comm=sshd;         stop_wait=10 ;;
    docker)       pidfile=/run/docker.pid;        comm=dockerd;      stop_wait=30 ;;
    glusterd)     pidfile=/run/glusterd.pid;      comm=glusterd;     stop_wait=10 ;;
    avahi-daemon) pidfile=/run/avahi-daemon/pid;  comm="avahi-daemon"; stop_wait=10 ;;
    cron)         pidfile=/run/crond.pid;         comm=cron;         stop_wait=10 ;;
    dbus)         pidfile=/run/dbus/pid;          comm=dbus-daemon;  stop_wait=10 ;;
    *) echo "lab-service: unknown service '$svc' (known: $SERVICES)" >&2; exit 2 ;;
esac

# The service's main pid, if it runs: its pid file (checked against the process name), else the
# oldest process of that name whose parent is the node's init (a daemon that lost its pid file;
# never a container's process, whose parent is a containerd shim).
main_pid() {
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || pid=""
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
        echo "$pid"; return 0
    fi
    pid=$(pgrep -o -x -P 1 "$comm") || return 1
    echo "$pid"
}

# wait_for SECONDS COMMAND...: poll every 0.1 s until COMMAND succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.1
    done
}
avahi_bus_name() {   # prints "boolean true" while some process owns the Avahi D-Bus name
    dbus-send --system --print-reply=literal --dest=org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus.NameHasOwner string:org.freedesktop.Avahi 2>/dev/null
}
avahi_name_free() { [[ "$(avahi_bus_name)" != *true* ]]; }
avahi_name_owned() { [[ "$(avahi_bus_name)" == *true* ]]; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
docker_answers() { curl -sf --max-time 2 --unix-socket /run/docker.sock http://docker/_ping; }

start() {
    local pid
    if pid=$(main_pid); then echo "$svc is already running (pid $pid)"; return 0; fi
    mkdir -p "$LOGDIR"
    case $svc in
        sshd)
            mkdir -p /run/sshd; chmod 0755 /run/sshd
            /usr/sbin/sshd -E "$LOGDIR/sshd.log" 9>&- || return 1 ;;
        dbus)
            mkdir -p /run/dbus
            rm -f /run/dbus/pid /run/dbus/system_bus_socket
            dbus-daemon --system --fork </dev/null >>"$LOGDIR/dbus.log" 2>&1 9>&- || return 1 ;;
        avahi-daemon)
            local dbus_pid
            dbus_pid=$(cat /run/dbus/pid 2>/dev/null || true)
            [ -n "$dbus_pid" ] && [ -d "/proc/$dbus_pid" ] \
                || "$0" dbus start >/dev/null || return 1
            # It exits at once if the previous instance's D-Bus name is not released yet.
            local try avahi
            for try in 1 2 3 4 5; do
                wait_for 5 avahi_name_free || true
                rm -f /run/avahi-daemon/pid
                setsid avahi-daemon --no-rlimits </dev/null >>"$LOGDIR/avahi-daemon.log" 2>&1 9>&- &
                avahi=$!
                wait_for 10 avahi_name_owned || true
                sleep 0.2
                kill -0 "$avahi" 2>/dev/null && break
                echo "avahi-daemon exited at start (try $try), retrying" >&2
                sleep 0.5
            done ;;
        cron)
            cron </dev/null >>"$LOGDIR/cron.log" 2>&1 9>&- || return 1 ;;
        glusterd)
            mkdir -p /run/gluster
            glusterd -p /run/glusterd.pid </dev/null >>"$LOGDIR/glusterd.log" 2>&1 9>&- || return 1
            wait_for 30 port_open 24007 \
                || { echo "glusterd does not answer on port 24007" >&2; return 1; } ;;
        docker)
            setsid dockerd --cgroup-parent "${LAB_CGROUP:?}" \
                </dev/null >>"$LOGDIR/docker.log" 2>&1 9>&- &
            local dockerd=$! deadline=$((SECONDS + 60))
            until docker_answers >/dev/null 2>&1; do
                if ! kill -0 "$dockerd" 2>/dev/null; then
                    echo "dockerd exited (see $LOGDIR/docker.log)" >&2; return 1
                fi
                if [ $SECONDS -ge $deadline ]; then
                    echo "dockerd does not answer (see $LOGDIR/docker.log)" >&2; return 1
                fi
                sleep 0.1
            done ;;
    esac
    # a daemon writes its pid file after its parent has returned: give it a moment
    wait_for 10 main_pid || { echo "$svc did not start (see $LOGDIR)" >&2; return 1; }
    pid=$(main_pid)
    echo "$svc started (pid $pid)"
}

stop() {
    local pid
    if ! pid=$(main_pid); then echo "$svc is not running"; return 0; fi
    kill -TERM "$pid" 2>/dev/null
    if ! wait_for "$stop_wait" eval "[ ! -d /proc/$pid ] || grep -q '^State:.*Z' /proc/$pid/status"
    then
        echo "$svc did not stop within ${stop_wait}s: killing it" >&2
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
    fi
    rm -f "$pidfile"
    [ "$svc" = avahi-daemon ] && { wait_for 5 avahi_name_free || true; }
    echo "$svc stopped"
}

# One start/stop/restart per service at a time (cron's Avahi restart and a person may meet);
# status waits for one in progress, so it never reports the gap inside a restart.
mkdir -p /run/haswarm-lab
exec 9>"/run/haswarm-lab/lab-service.$svc.lock"
if [ "$action" = status ]; then lockmode=-s; else lockmode=-x; fi
flock $lockmode -w 60 9 || { echo "lab-service: $svc is busy (another lab-service $svc)" >&2; exit 1; }

case $action in
    start) start ;;
    stop) stop ;;
    restart) stop >/dev/null && start ;;
    status)
        if pid=$(main_pid); then echo "$svc is running (pid $pid)"; exit 0; fi
        echo "$svc is stopped"; exit 3 ;;
    *) usage ;;
esac
