#!/bin/bash
# Builds the bench guest's initramfs: guest/build-initramfs.sh's busybox image plus Debian's
# fio with every shared library it loads, and bench/guest/metaloop (built static here).
# The extra files go into a second, uncompressed cpio appended to the first (the kernel unpacks
# concatenated archives); uncompressed because decompressing ~90 MB under TCG costs more than
# loading it.
# Usage: build-guest-initramfs.sh KDIR OUT     (KDIR: guest/work/k61)
# Downloads (apt-get download, never installs) fio and the library packages of its dependency
# closure that are not installed on this host, into guest/work/bench-debs/.  Idempotent: OUT
# is rebuilt only when older than this script, metaloop.c or the base initramfs.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 KDIR OUT" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
KDIR=$(cd "$1" && pwd)
OUT=$2
SELF=$HERE/$(basename "$0")
WORK=$ROOT/guest/work/bench-debs
BASE=$WORK/base-$(basename "$KDIR").gz
mkdir -p "$WORK"

bash "$ROOT/guest/build-initramfs.sh" "$KDIR" "$BASE"
if [ -s "$OUT" ] && [ "$OUT" -nt "$SELF" ] && [ "$OUT" -nt "$BASE" ] \
   && [ "$OUT" -nt "$HERE/guest/metaloop.c" ]; then
  exit 0
fi

# apt-get download runs as _apt when it can; a root-owned cache dir is fine for root.
download() {
  (cd "$WORK" && apt-get download -q "$@" >/dev/null 2>&1) \
    || { apt-get update -qq && (cd "$WORK" && apt-get download -q "$@" >/dev/null); }
}
if [ ! -e "$WORK/.fetched" ]; then
  # fio plus the libraries of its dependency closure this host lacks (those it has are
  # copied from the host below: same release).
  mapfile -t libs < <(apt-cache depends --recurse --no-recommends --no-suggests \
      --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends fio \
    | grep -E '^lib' | sort -u)
  need=(fio)
  for p in "${libs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || need+=("$p")
  done
  download "${need[@]}"
  touch "$WORK/.fetched"
fi

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
X=$STAGE/x
mkdir -p "$X" "$STAGE/root/bin" "$STAGE/root/lib/x86_64-linux-gnu" "$STAGE/root/lib64"
for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$X"; done
cp "$X/usr/bin/fio" "$STAGE/root/bin/fio"
libpath=$X/usr/lib/x86_64-linux-gnu:$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu/ceph
closure=$(LD_LIBRARY_PATH=$libpath ldd "$X/usr/bin/fio")
if grep -q "not found" <<< "$closure"; then
  echo "fio's libraries are incomplete:" >&2
  grep "not found" <<< "$closure" >&2
  exit 1
fi
# "libfoo.so.1 => /path (addr)": copy the file the loader resolved, under its soname.
while read -r name _ path _; do
  [ -n "$path" ] && [ -e "$path" ] || continue
  cp -L "$path" "$STAGE/root/lib/x86_64-linux-gnu/$name"
done < <(grep "=>" <<< "$closure")
cp -L /lib64/ld-linux-x86-64.so.2 "$STAGE/root/lib64/"
cc -O2 -static -o "$STAGE/root/bin/metaloop" "$HERE/guest/metaloop.c"

tmp=$OUT.tmp.$$
cp "$BASE" "$tmp"
# The kernel looks for the next archive's magic only at 4-byte aligned offsets, skipping zero
# bytes: pad the first archive to a 512-byte boundary.
pad=$(( (512 - $(stat -c %s "$tmp") % 512) % 512 ))
head -c "$pad" /dev/zero >> "$tmp"
(cd "$STAGE/root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
  >> "$tmp"
mv "$tmp" "$OUT"
