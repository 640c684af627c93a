#!/usr/bin/env bash
# Install what haswarm and its lab need on a Debian (12+) controller: Debian packages for the
# local lab (sshd, dockerd, glusterd, avahi, cron, tini per simulated Pi), QEMU for cross-builds,
# and the Python package with its test extras. Safe to run again. Needs root.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo ./install.sh)" >&2
  exit 1
fi

packages=(
  docker.io openssh-server openssh-client glusterfs-server glusterfs-client
  avahi-daemon avahi-utils libnss-mdns dbus cron tini mmdebstrap iptables iproute2
  qemu-user-static binfmt-support mosquitto-clients mariadb-client rsync procps psmisc socat
  keepalived curl ca-certificates git python3-pip sudo docker-registry netcat-openbsd
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing ${missing[*]}"
  # Keep apt from starting the daemons on the controller itself: the lab starts its own.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
else
  echo "install.sh: Debian packages present"
fi

# Debian's own python3 refuses pip installs outside a venv (PEP 668): say that this is meant.
if ! python3 -m pip install -q -e '.[test]' 2>/tmp/haswarm-pip.err; then
  if grep -q externally-managed /tmp/haswarm-pip.err; then
    python3 -m pip install -q --break-system-packages -e '.[test]'
  else
    cat /tmp/haswarm-pip.err >&2
    exit 1
  fi
fi
# pip compiles an installed package to bytecode; an editable install leaves the tree as source.
# Compile it here: with PYTHONDONTWRITEBYTECODE set (some shells and images set it), every doit
# call would otherwise compile tasks/ again (~0.1 s of each `doit list`).
python3 -m compileall -q dodo.py tasks lab
echo "install.sh: done. Next: doit setup (deploys onto the local lab unless config/cluster.yml exists)"
