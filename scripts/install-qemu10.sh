#!/bin/bash
# Installs QEMU 10 from Debian 13 (trixie) into a debootstrap tree, guest/work/qemu10 (or
# $QEMU10_DIR, which the tests read too), for the
# live-migration tests (tests/test_guest_migration.py): QEMU 7.2 of Debian 12 moves no
# vhost-user back-end state (DEVICE_STATE came with QEMU 9).  Nothing is installed on the host
# but debootstrap itself.  The tests run the tree's QEMU through the tree's own dynamic loader
# (guest/run.py qemu10_command), so no chroot, bind mount or root is needed to run it.
# Idempotent: a tree whose .done holds this script's TREE_VERSION is kept.
# Usage: install-qemu10.sh   (needs root, apt and deb.debian.org)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=${QEMU10_DIR:-$HERE/guest/work/qemu10}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TREE_VERSION=1

if [ -f "$TREE/.done" ] && [ "$(cat "$TREE/.done")" = "$TREE_VERSION" ]; then
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "install-qemu10: installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
# A tree left half-made by an interrupted run is started again from nothing.
rm -rf "$TREE"
mkdir -p "$(dirname "$TREE")"
echo "install-qemu10: debootstrap trixie with qemu-system-x86 into $TREE (a few minutes)"
debootstrap --variant=minbase --include=qemu-system-x86 trixie "$TREE" "$MIRROR" >/dev/null
chroot "$TREE" qemu-system-x86_64 --version | head -n1
echo "$TREE_VERSION" > "$TREE/.done"
