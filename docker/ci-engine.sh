#!/usr/bin/env bash
# Provide a Docker engine and a local base image for tests/test_docker.py.
#
# Idempotent: every step checks first and skips what is already done, so .ci/run
# can call it before every pytest run. Each step prints what it does and how long
# it took. Without root (or without apt) it prints why and exits 0: the docker
# tests then skip themselves because `docker info` does not answer.
#
# Why the odd flags: this machine reaches no image registry and must never send
# traffic to private-range addresses, so dockerd runs without a bridge network or
# iptables rules (builds use --network host, test containers --network none), and
# the base image is made locally with debootstrap instead of `docker pull`.
#
# Knobs (environment): APPLIANCE_BASE_IMAGE (tag of the local base image),
# DEBIAN_MIRROR, DOCKERD_LOG, DOCKER (the CLI; the 20.10 one has BuildKit built in,
# newer CLIs need the buildx plugin for `docker build`).
set -euo pipefail

BASE_TAG="${APPLIANCE_BASE_IMAGE:-sana-appliance-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LOG="${DOCKERD_LOG:-/var/log/sana-dockerd.log}"
DOCKER="${DOCKER:-/usr/bin/docker}"
DOCKERD="$(PATH="$PATH:/usr/sbin:/sbin" command -v dockerd || echo /usr/sbin/dockerd)"
T_START=$SECONDS

say() { printf '[ci-engine] %s\n' "$*"; }
took() { say "$1 took $(( SECONDS - $2 )) s"; }

engine_answers() { [ -x "$DOCKER" ] && timeout 10 "$DOCKER" info >/dev/null 2>&1; }

# 1. Engine binaries ---------------------------------------------------------------
if [ -x "$DOCKERD" ] && [ -x "$DOCKER" ] && command -v debootstrap >/dev/null 2>&1; then
    say "docker.io and debootstrap already installed ($("$DOCKER" --version))"
elif [ "$(id -u)" -ne 0 ]; then
    say "SKIP: not root and docker.io/debootstrap missing; docker tests will be skipped"
    exit 0
elif ! command -v apt-get >/dev/null 2>&1; then
    say "SKIP: no apt-get to install docker.io/debootstrap; docker tests will be skipped"
    exit 0
else
    t=$SECONDS
    DOCKERD=/usr/sbin/dockerd
    say "installing docker.io debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # No service manager here: tell the package scripts not to start dockerd themselves.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null 2>&1; }; then
        [ "$policy_created" = 1 ] && rm -f /usr/sbin/policy-rc.d
        say "SKIP: apt-get could not install docker.io/debootstrap; docker tests will be skipped"
        exit 0
    fi
    [ "$policy_created" = 1 ] && rm -f /usr/sbin/policy-rc.d
    took "apt-get install" "$t"
fi

# 2. Engine -------------------------------------------------------------------------
if engine_answers; then
    say "engine already answers: $("$DOCKER" info --format '{{.ServerVersion}} storage={{.Driver}} cgroup={{.CgroupVersion}}')"
else
    if [ "$(id -u)" -ne 0 ]; then
        say "SKIP: no engine answers and only root can start dockerd; docker tests will be skipped"
        exit 0
    fi
    t=$SECONDS
    say "starting dockerd --bridge=none --iptables=false (log: $LOG)"
    # setsid: the daemon must outlive this script and the CI step that ran it.
    setsid nohup "$DOCKERD" --bridge=none --iptables=false --ip-masq=false \
        >>"$LOG" 2>&1 < /dev/null &
    say "dockerd pid $!"
    for _ in $(seq 1 60); do
        engine_answers && break
        sleep 1
    done
    if ! engine_answers; then
        say "ERROR: dockerd did not answer within 60 s; last log lines:"
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    took "engine start" "$t"
    say "engine: $("$DOCKER" info --format '{{.ServerVersion}} storage={{.Driver}} cgroup={{.CgroupVersion}}')"
fi

# 3. Base image ---------------------------------------------------------------------
if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    say "base image $BASE_TAG already present"
else
    t=$SECONDS
    rootfs="$(mktemp -d /tmp/sana-rootfs.XXXXXX)"
    say "debootstrap bookworm (minbase + python3, python3-venv, ca-certificates) into $rootfs from $MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; exit 1; }
    # Drop downloaded .debs: they are not part of a base image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    say "importing $rootfs as $BASE_TAG"
    tar -C "$rootfs" -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    took "base image" "$t"
fi

took "ci-engine.sh" "$T_START"
