#!/bin/sh
# Container start shim: decide which unprivileged user trains, then exec the command.
#
# Why not simply `USER 1000` in the image: RunPod and Vast.ai mount their volume at
# /workspace owned by root and offer no `--user` flag, so a fixed non-root user could
# not write there. Like the official postgres/redis images, the container starts as
# root only long enough to pick the user, and the trainer never runs as root:
#   started as a non-root uid (--user, Kubernetes runAsUser): run as that uid, untouched;
#   started as root and $WORKSPACE belongs to a non-root uid (a host bind mount):
#       run as that uid, so outputs on the host belong to the host user;
#   started as root and $WORKSPACE belongs to root (a fresh cloud volume):
#       hand the top folder (not its contents) to `sana` (1000:1000) and run as that.
# Every step is an exec, so tini (PID 1) forwards signals straight to python.
set -eu

if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi

ws="${WORKSPACE:-/workspace}"
mkdir -p "$ws"
uid="$(stat -c %u "$ws")"
gid="$(stat -c %g "$ws")"
if [ "$uid" = 0 ]; then
    uid=1000
    gid=1000
    chown 1000:1000 "$ws" 2>/dev/null \
        || echo "sana-entrypoint: warning: cannot chown $ws to 1000:1000; it must be writable by uid 1000" >&2
fi
if [ "$uid" = 1000 ]; then
    home=/home/sana
else
    # A host uid the image does not know: give it a private HOME for tool caches.
    home="/tmp/home-$uid"
    mkdir -p "$home" && chown "$uid:$gid" "$home" && chmod 700 "$home"
fi
export HOME="$home"
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups "$@"
