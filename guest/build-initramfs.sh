#!/bin/bash
# Builds the guest's initramfs (cpio newc, gzip): a static busybox, the kernel tree's virtio-fs
# modules (if it has any, see fetch-kernels.sh) and an /init that mounts the virtio-fs share,
# runs the workload script the host put in the share, prints its result on the serial console,
# unmounts and powers off.
# Usage: build-initramfs.sh KDIR OUT   (KDIR: guest/work/k61 or guest/work/k612)
# Idempotent: OUT is rebuilt only when it is older than this script or the module list.
#
# Kernel command line parameters read by /init:
#   vfs.tag=TAG        virtio-fs tag to mount at /mnt (required)
#   vfs.script=PATH    script to run, relative to the share (default .guest-script.sh)
#   vfs.modules=A,B    optional modules to load first (the kernel tree's modules/optional/, in
#                      the order given: e.g. button, for an ACPI power button press)
# Console markers (one per line, for the host to parse):
#   @@GUEST modules-loaded UPTIME / @@GUEST mounted UPTIME / @@GUEST script-exit RC UPTIME
#   @@GUEST umount RC / @@GUEST error MESSAGE / @@GUEST poweroff
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 KDIR OUT" >&2; exit 2; }
KDIR=$(cd "$1" && pwd)
OUT=$2
BUSYBOX=${BUSYBOX:-/bin/busybox}
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")

[ -e "$KDIR/.done" ] || { echo "$KDIR is not a fetched kernel tree (run fetch-kernels.sh)" >&2; exit 1; }
if ! file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
   && ! "$BUSYBOX" 2>&1 | head -n1 | grep -q BusyBox; then
  echo "$BUSYBOX is not a busybox binary (apt-get install busybox-static)" >&2
  exit 1
fi
if [ -s "$OUT" ] && [ "$OUT" -nt "$SELF" ] && [ "$OUT" -nt "$KDIR/.done" ]; then
  exit 0
fi

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$BUSYBOX" "$STAGE/bin/busybox"
if [ -d "$KDIR/modules" ]; then
  cp "$KDIR"/modules/*.ko "$STAGE/lib/modules/" 2>/dev/null || true
  cp "$KDIR/modules/modules.order" "$STAGE/lib/modules/"
  if [ -d "$KDIR/modules/optional" ]; then
    mkdir -p "$STAGE/lib/modules/optional"
    cp "$KDIR"/modules/optional/*.ko "$STAGE/lib/modules/optional/" 2>/dev/null || true
  fi
fi

cat > "$STAGE/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mark() { echo "@@GUEST $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
die() {
  mark error "$*"
  mark poweroff
  poweroff -f
  sleep 5
  exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
mount -t tmpfs tmpfs /tmp
# The serial console is the only output the host reads.
exec </dev/console >/dev/console 2>&1

TAG=
SCRIPT=.guest-script.sh
OPTIONAL=
for arg in $(cat /proc/cmdline); do
  case $arg in
    vfs.tag=*) TAG=${arg#vfs.tag=} ;;
    vfs.script=*) SCRIPT=${arg#vfs.script=} ;;
    vfs.modules=*) OPTIONAL=${arg#vfs.modules=} ;;
  esac
done
[ -n "$TAG" ] || die "no vfs.tag= on the kernel command line"

if [ -s /lib/modules/modules.order ]; then
  while read -r ko; do
    insmod "/lib/modules/$ko" || die "insmod $ko failed"
  done < /lib/modules/modules.order
fi
for m in $(echo "${OPTIONAL:-}" | tr ',' ' '); do
  insmod "/lib/modules/optional/$m.ko" || die "insmod optional module $m failed"
done
mark modules-loaded "$(up)"

mount -t virtiofs "$TAG" /mnt || die "mount -t virtiofs $TAG /mnt failed"
mark mounted "$(up)"

if [ -f "/mnt/$SCRIPT" ]; then
  cd /mnt || die "cd /mnt failed"
  sh "/mnt/$SCRIPT"
  rc=$?
  cd /
else
  echo "no /mnt/$SCRIPT in the share: nothing to run"
  rc=127
fi
mark script-exit "$rc" "$(up)"

sync
umount /mnt
mark umount "$?"
mark poweroff
poweroff -f
sleep 5
INIT
chmod 755 "$STAGE/init"

mkdir -p "$(dirname "$OUT")"
tmp=$OUT.tmp.$$
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
  | gzip -9n > "$tmp"
mv "$tmp" "$OUT"
