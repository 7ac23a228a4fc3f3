#!/bin/bash
# Installs everything pyvirtiofsd needs on a Debian 12 machine (run as root), into .venv/ of
# this checkout.  Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc libcap-dev libseccomp2 libseccomp-dev
    qemu-system-x86 busybox-static cpio xz-utils zstd fuse3 attr sqlite3 git
    # libvirt's daemon, QEMU driver and virsh for the libvirt domain test, which starts the
    # daemon itself (no systemd needed); -system creates the libvirt-qemu user the QEMU driver
    # resolves at start-up.  systemd for `systemd-analyze verify` on the units in etc/.
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients systemd
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating the virtual environment .venv/"
    python3 -m venv .venv
fi
echo "setup: installing pyvirtiofsd and its Python dependencies into .venv/"
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
# Wheels of the runtime dependencies, so that the wheel test (tests/test_wheel.py) installs the
# built wheel into a clean virtual environment without the network.
echo "setup: collecting wheels of the runtime dependencies into .venv/wheelhouse/"
mapfile -t deps < <(.venv/bin/python -c 'import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))')
.venv/bin/pip wheel -q --disable-pip-version-check --wheel-dir .venv/wheelhouse "${deps[@]}"

# The daemons pyvirtiofsd is compared with (Rust virtiofsd 1.13, QEMU's C virtiofsd).
echo "setup: installing the reference virtiofsd daemons under /opt/anchors"
bash scripts/install-anchors.sh >/dev/null

# Guest kernels (Debian 6.1 and trixie's 6.12), fetched as packages and unpacked, not installed.
echo "setup: fetching the guest kernels (cached under guest/work/)"
bash guest/fetch-kernels.sh >/dev/null
# QEMU 10 (Debian trixie) in a debootstrap tree, for the live-migration guest test.
echo "setup: installing QEMU 10 for the migration test (cached under guest/work/qemu10)"
bash scripts/install-qemu10.sh >/dev/null
echo "setup: done; the daemon is .venv/bin/pyvirtiofsd"
