#!/bin/bash
# node-init.sh: the "boot" of one simulated Raspberry Pi of the haswarm lab.
#
# lab/nodes.py starts it as
#   nsenter --net=/run/netns/hswlab-NAME unshare --mount --uts --pid --fork --mount-proc \
#       --propagation private tini -s -- lab/node-init.sh
# so it runs as PID 2 of the node (tini is PID 1) in a fresh mount, UTS and PID namespace, inside
# the node's network namespace (eth0 already configured by the host side). It
#   1. builds the node's private file system view (see "Mounts" below),
#   2. provisions the node on its first boot (machine-id, host identity, sshd config),
#   3. starts the services a Pi would start at boot (sshd, dbus, avahi-daemon, dockerd, glusterd,
#      cron) through lab-service, the node's systemctl stand-in,
#   4. then waits; SIGTERM (lab-down) stops the services in order and ends the node.
# Killing tini (lab-kill) ends every process of the node at once instead, as a power cut would.
#
# Environment (set by lab/nodes.py, nothing else is inherited from the host):
#   LAB_NODE         node name, also its host name            e.g. pi1
#   LAB_ADDRESS      its address on the lab bridge            e.g. 10.77.0.11
#   LAB_NODE_DIR     its disk on the host (kept across boots) e.g. <project>/.lab/nodes/pi1
#   LAB_STATE_DIR    <project>/.lab (hidden from the node once booted)
#   LAB_SCRIPTS      <project>/lab
#   LAB_CGROUP       cgroup of the node, given to dockerd as --cgroup-parent, e.g. /haswarm-lab/pi1
#   LAB_AUTHORIZED_KEY  the controller's public key (one line)
#
# Everything it prints goes to <node dir>/console.log.
set -euo pipefail

: "${LAB_NODE:?}" "${LAB_ADDRESS:?}" "${LAB_NODE_DIR:?}" "${LAB_STATE_DIR:?}" "${LAB_SCRIPTS:?}"
: "${LAB_CGROUP:?}" "${LAB_AUTHORIZED_KEY:?}"

log() { echo "$(date '+%F %T.%3N') node-init[$LAB_NODE]: $*"; }
log "booting (address $LAB_ADDRESS)"

# ---------------------------------------------------------------------------------------------
# Mounts. Everything below happens in the node's own mount namespace (private propagation), so
# the host never sees any of it and it all disappears when the node's last process ends.
#   /run                          tmpfs (pid files, sockets: a private docker.sock, dbus, sshd)
#   /sys                          a fresh sysfs for the node's netns, the host's cgroup tree kept
#   /etc, /var, /usr/local        overlayfs: host files below, the node's own changes above, so
#                                 /etc/fstab, /etc/cron.d, /etc/mysql, /var/lib/glusterd, ... are
#                                 the real default paths and private to the node
#   /root, /srv, /mnt,            the node's own directories on the host's real file system
#   /var/lib/docker               (overlay2 and Gluster brick xattrs need a real ext4, not an
#                                 overlay upper)
#   /tmp, /dev/shm                fresh tmpfs
#   <project>/.lab                hidden (empty tmpfs): a node cannot see other nodes' disks
mount --make-rprivate /

mount -t tmpfs -o mode=0755,nosuid,nodev,size=256m run /run
mkdir -p /run/lock /run/haswarm-lab
chmod 1777 /run/lock

# `ip netns exec` would remount /sys and lose /sys/fs/cgroup (dockerd then finds no cgroups):
# keep the cgroup tree aside, mount a sysfs that belongs to this netns, put the tree back.
mkdir /run/haswarm-lab/cgroup
mount --rbind /sys/fs/cgroup /run/haswarm-lab/cgroup
umount -l /sys
mount -t sysfs sysfs /sys
mount --move /run/haswarm-lab/cgroup /sys/fs/cgroup
rmdir /run/haswarm-lab/cgroup 2>/dev/null || true

for dir in etc var usr/local; do
    key=${dir//\//-}
    mkdir -p "$LAB_NODE_DIR/upper/$key" "$LAB_NODE_DIR/work/$key"
    # After a kill the previous instance's overlay may need a moment to be released.
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if mount -t overlay "lab-$key" \
            -o "lowerdir=/$dir,upperdir=$LAB_NODE_DIR/upper/$key,workdir=$LAB_NODE_DIR/work/$key" \
            "/$dir"; then
            break
        fi
        [ "$try" = 10 ] && { log "cannot mount the overlay on /$dir"; exit 1; }
        sleep 0.5
    done
done

for dir in root srv mnt docker; do
    mkdir -p "$LAB_NODE_DIR/$dir"
done
chmod 0700 "$LAB_NODE_DIR/root"
mount --bind "$LAB_NODE_DIR/root" /root
mount --bind "$LAB_NODE_DIR/srv" /srv
mount --bind "$LAB_NODE_DIR/mnt" /mnt
mkdir -p /var/lib/docker
mount --bind "$LAB_NODE_DIR/docker" /var/lib/docker
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm

# ---------------------------------------------------------------------------------------------
# Host identity. On the first boot: everything a cloned SD card would share with the host.
hostname "$LAB_NODE"
if [ ! -e /var/lib/haswarm-lab/provisioned ]; then
    log "first boot: provisioning"
    mkdir -p /var/lib/haswarm-lab
    rm -f /etc/machine-id /var/lib/dbus/machine-id
    dbus-uuidgen > /etc/machine-id
    mkdir -p /var/lib/dbus && cp /etc/machine-id /var/lib/dbus/machine-id
    rm -f /etc/ssh/ssh_host_*                 # the host's keys: the node gets its own below
    rm -f /etc/docker/key.json                # the host dockerd's identity
    rm -f /var/lib/glusterd/glusterd.info     # the host glusterd's UUID, if it ever had one
    cat > /etc/ssh/sshd_config <<'EOF'
# haswarm lab node: key authentication only, as root (see lab/node-init.sh)
Include /etc/ssh/sshd_config.d/*.conf
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
MaxStartups 50:30:100
MaxSessions 50
UseDNS no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    touch /var/lib/haswarm-lab/provisioned
fi

# Every boot, as DHCP and the image would on a Pi.
echo "$LAB_NODE" > /etc/hostname
rm -f /etc/hosts /etc/resolv.conf
cat > /etc/hosts <<EOF
127.0.0.1	localhost
127.0.1.1	$LAB_NODE
$LAB_ADDRESS	$LAB_NODE
::1		localhost ip6-localhost ip6-loopback
EOF
# No DNS server in the lab: fail lookups at once (swarm asks a registry before using a local
# image; an unreachable resolver costs ~5 s per lookup, a refused one ~nothing).
cat > /etc/resolv.conf <<'EOF'
nameserver 127.0.0.1
options timeout:1 attempts:1
EOF

# The node's own SSH host key (generated once by lab/nodes.py; lab/access.py put its public half
# in .lab/ssh/known_hosts) and the controller's key for root.
if ! cmp -s "$LAB_NODE_DIR/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key; then
    install -m 0600 "$LAB_NODE_DIR/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
    install -m 0644 "$LAB_NODE_DIR/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
fi
mkdir -p /root/.ssh; chmod 0700 /root/.ssh
touch /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
grep -qxF "$LAB_AUTHORIZED_KEY" /root/.ssh/authorized_keys \
    || echo "$LAB_AUTHORIZED_KEY" >> /root/.ssh/authorized_keys

# systemctl stand-in (config/lab.yml: mdns.restart_command uses it).
install -D -m 0755 "$LAB_SCRIPTS/lab-service.sh" /usr/local/sbin/lab-service
cat > /run/haswarm-lab/node.env <<EOF
LAB_NODE=$LAB_NODE
LAB_ADDRESS=$LAB_ADDRESS
LAB_CGROUP=$LAB_CGROUP
EOF
mkdir -p /var/log/haswarm-lab

# Nothing of the host's lab state from here on.
mount -t tmpfs -o mode=0700,size=64k lab-hidden "$LAB_STATE_DIR"

# ---------------------------------------------------------------------------------------------
# Services, in the order systemd would reach them. The slow ones start in parallel.
# A service that fails does not stop the boot (as on a Pi): lab-up reports the node as not
# ready, naming the service.
start() { local out rc=0; out=$(lab-service "$1" start 2>&1) || rc=$?; log "$out"; return $rc; }
failed=""
start sshd || failed+=" sshd"
start dbus || failed+=" dbus"
declare -A jobs=()
for svc in docker glusterd avahi-daemon cron; do
    start "$svc" & jobs[$svc]=$!
done
for svc in "${!jobs[@]}"; do wait "${jobs[$svc]}" || failed+=" $svc"; done
if [ -z "$failed" ]; then log "up"; else log "up, but failed to start:$failed"; fi
touch /run/haswarm-lab/booted

# Network file systems from /etc/fstab, as systemd's remote-fs.target mounts `_netdev` lines on a
# Pi: retried in the background until the volume's bricks answer (peers may still be booting).
if grep -qE '^[^#].*[[:space:]]glusterfs[[:space:]]' /etc/fstab 2>/dev/null; then
    (
        for _ in $(seq 60); do
            mount -a -t glusterfs >/dev/null 2>&1 || true    # (set -e: a failure retries)
            missing=0
            while read -r _ mnt fstype _; do
                if [ "$fstype" = glusterfs ] && ! mountpoint -q "$mnt"; then missing=1; fi
            done < <(grep -E '^[^#]' /etc/fstab)
            [ "$missing" = 0 ] && { log "fstab: glusterfs mounted"; exit 0; }
            sleep 2
        done
        log "fstab: glusterfs still not mounted after 120 s"
    ) </dev/null &
fi

# ---------------------------------------------------------------------------------------------
# Shutdown (lab-down sends SIGTERM to tini, which passes it on to us).
shutdown() {
    log "shutting down"
    for svc in docker cron avahi-daemon dbus glusterd sshd; do
        lab-service "$svc" stop >/dev/null 2>&1 || true
    done
    # Whatever is left (Gluster bricks and FUSE clients, sessions): ask politely, then tini's
    # exit kills the rest.
    kill -TERM -1 2>/dev/null || true
    wait "${sleeper:-}" 2>/dev/null || true
    for _ in $(seq 15); do
        procs=(/proc/[0-9]*)        # a glob, no subprocess: tini and this shell are left?
        [ "${#procs[@]}" -le 2 ] && break
        sleep 0.2
    done
    log "down"
    exit 0
}
trap shutdown TERM INT
sleep infinity &
sleeper=$!
wait "$sleeper" || true
# only a signal gets here: the trap has exited already
