#!/bin/bash
# Installs a vhost-user back-end descriptor (QEMU's docs/interop/vhost-user.json schema, type
# "fs") so that libvirt finds pyvirtiofsd for a <filesystem> with <driver type='virtiofs'/> and
# no <binary path=...>.  libvirt reads every *.json in /usr/share/qemu/vhost-user,
# /etc/qemu/vhost-user and ~/.config/qemu/vhost-user, sorted by file name across them, and takes
# the first of type "fs": the "40-" prefix puts pyvirtiofsd before the other virtio-fs daemons'
# "50-" descriptors (QEMU's and the Rust virtiofsd's).
#
# Usage: install-vhost-user.sh [--dir DIR] [BINARY]
#   DIR     where to write 40-pyvirtiofsd.json (default /etc/qemu/vhost-user)
#   BINARY  the pyvirtiofsd to run (default: `command -v pyvirtiofsd`); made absolute
set -euo pipefail
dir=/etc/qemu/vhost-user
if [ "${1:-}" = --dir ]; then
  [ $# -ge 2 ] || { echo "install-vhost-user.sh: --dir needs a directory" >&2; exit 2; }
  dir=$2
  shift 2
fi
[ $# -le 1 ] || { echo "usage: install-vhost-user.sh [--dir DIR] [BINARY]" >&2; exit 2; }
binary=${1:-$(command -v pyvirtiofsd || true)}
[ -n "$binary" ] || { echo "install-vhost-user.sh: pyvirtiofsd is not on PATH; name it" >&2; exit 2; }
binary=$(realpath -s "$binary")
[ -x "$binary" ] || { echo "install-vhost-user.sh: $binary is not executable" >&2; exit 2; }
case $binary in
  *\"* | *\\*) echo "install-vhost-user.sh: $binary: no quotes or backslashes, please" >&2; exit 2 ;;
esac
# The binary must say it is a virtio-fs back-end, as the schema asks of --print-capabilities.
if ! "$binary" --print-capabilities | grep -q '"type": "fs"'; then
  echo "install-vhost-user.sh: $binary --print-capabilities does not report type \"fs\"" >&2
  exit 1
fi
mkdir -p "$dir"
tmp=$(mktemp "$dir/.40-pyvirtiofsd.json.XXXXXX")
cat > "$tmp" <<JSON
{
  "description": "pyvirtiofsd: virtio-fs vhost-user back-end (virtiofsd compatible)",
  "type": "fs",
  "binary": "$binary"
}
JSON
chmod 644 "$tmp"
mv "$tmp" "$dir/40-pyvirtiofsd.json"
echo "installed $dir/40-pyvirtiofsd.json for $binary"
