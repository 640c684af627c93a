#!/bin/sh
# Like eclipse-mosquitto's entrypoint: when started as root, give the mosquitto user (1883) its
# directories (they may be fresh bind mounts or a fresh tmpfs /run), then run the command.
# Started as root, mosquitto 2.0 drops to the user "mosquitto" right after parsing its config
# file: the password file, persistence db, pid file and log file are then opened as uid 1883.
set -e
if [ "$(id -u)" = 0 ]; then
    install -d -o mosquitto -g mosquitto /run/mosquitto
    for dir in /mosquitto/data /mosquitto/log; do
        [ -d "$dir" ] && chown -R mosquitto:mosquitto "$dir" 2>/dev/null || true
    done
fi
# Debian's mosquitto (measured with 2.0.11) block-buffers `log_dest stdout` when stdout is not a terminal (the
# lines reach `docker logs` only at exit): line-buffer it.
case "$1" in
    mosquitto | */mosquitto) exec stdbuf -oL "$@" ;;
esac
exec "$@"
