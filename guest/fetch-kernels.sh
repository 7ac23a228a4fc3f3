#!/bin/bash
# Fetches the two Debian guest kernels the real-guest tests boot, unpacked (never installed):
#   guest/work/k61   Debian 12 (bookworm) 6.1: virtio-fs, fuse, virtio-pci are modules
#   guest/work/k612  Debian 13 (trixie) 6.12: virtio-fs, fuse, virtio-pci are built in
# Each tree gets vmlinuz (the kernel image) and, for k61, modules/ holding the uncompressed .ko
# files the initramfs loads plus modules.order (load order), and modules/optional/ (loaded on
# request). Idempotent: a tree whose .done holds this script's TREE_VERSION is kept.
# Usage: fetch-kernels.sh [61|612]...   (default: both). Needs root, apt and deb.debian.org.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$HERE/work
mkdir -p "$WORK"

# Modules the guest needs for a virtio-fs mount, in no particular order; resolve_modules orders
# them, with their dependencies.
NEEDED=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs)
# Modules the initramfs loads only when the kernel command line asks (vfs.modules=NAME,...), kept
# in modules/optional/: button, so that the guest sees an ACPI power button press (what
# `virsh shutdown` sends) in /sys/firmware/acpi/interrupts/ff_pwr_btn.
OPTIONAL=(button)
# Written into .done: a tree fetched by an older version of this script (other modules) is
# fetched again.
TREE_VERSION=2

# Resolves the concrete kernel package a metapackage depends on (e.g. linux-image-6.1.0-NN-amd64).
# $1: apt options (word-split on purpose), $2: metapackage.
kernel_package() {
  local opts=$1 meta=$2
  # shellcheck disable=SC2086
  apt-cache $opts depends "$meta" | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' \
    | head -n1
}

# Prints "y", "m" or "" for CONFIG_$2 in kernel config $1.
config_value() {
  sed -n "s/^CONFIG_$2=\(.*\)$/\1/p" "$1"
}

# Writes $dst/modules/*.ko (decompressed) and $dst/modules/modules.order for the needed modules
# that the kernel built as modules, dependencies first. The package ships no modules.dep (depmod
# makes it at install time), so dependencies come from each module's own .modinfo "depends=".
resolve_modules() {
  local root=$1 dst=$2
  local moddir
  moddir=$(find "$root/lib/modules" "$root/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d \
    2>/dev/null | head -n1 || true)
  [ -n "$moddir" ] || { echo "no lib/modules in $root" >&2; return 1; }
  mkdir -p "$dst/modules"
  : > "$dst/modules/modules.order"
  local -A seen=()
  # Depth-first so each module follows what it depends on. $1: module name.
  visit() {
    local name=$1
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    local rel
    # File names may spell '_' as '-'; modules.order lists paths without compression suffix.
    rel=$(grep -E "/(${name}|${name//_/-})\.ko$" "$moddir/modules.order" | head -n1 || true)
    if [ -z "$rel" ]; then
      if grep -qE "/(${name}|${name//_/-})\.ko$" "$moddir/modules.builtin"; then
        return 0
      fi
      echo "module $name is neither a module nor built in" >&2
      return 1
    fi
    local ko
    ko=$outdir/$(basename "$rel")
    if [ -f "$moddir/$rel" ]; then cp "$moddir/$rel" "$ko"
    elif [ -f "$moddir/$rel.xz" ]; then xz -dc "$moddir/$rel.xz" > "$ko"
    elif [ -f "$moddir/$rel.zst" ]; then zstd -qdc "$moddir/$rel.zst" > "$ko"
    else echo "module file $rel missing" >&2; return 1
    fi
    local deps d
    deps=$(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
    for d in $deps; do visit "$d" || return 1; done
    basename "$ko" >> "$order"
  }
  local m
  local outdir=$dst/modules order=$dst/modules/modules.order
  for m in "${NEEDED[@]}"; do visit "$m" || return 1; done
  outdir=$dst/modules/optional
  order=$outdir/modules.order
  mkdir -p "$outdir"
  : > "$order"
  for m in "${OPTIONAL[@]}"; do visit "$m" || return 1; done
}

# $1: tree name, $2: apt options, $3: metapackage.
fetch_tree() {
  local name=$1 opts=$2 meta=$3
  local dst=$WORK/$name
  [ "$(cat "$dst/.done" 2>/dev/null)" = "$TREE_VERSION" ] && return 0
  local pkg
  pkg=$(kernel_package "$opts" "$meta")
  [ -n "$pkg" ] || { echo "cannot resolve the kernel package of $meta" >&2; return 1; }
  echo "fetching $pkg into $dst" >&2
  rm -rf "$dst" "$WORK/$name.deb"
  mkdir -p "$WORK/$name.deb" "$dst"
  # shellcheck disable=SC2086
  (cd "$WORK/$name.deb" && apt-get $opts -o APT::Sandbox::User=root download "$pkg" >/dev/null)
  dpkg-deb -x "$WORK/$name.deb"/*.deb "$dst/root"
  local config vmlinuz
  config=$(echo "$dst"/root/boot/config-* | head -n1)
  vmlinuz=$(echo "$dst"/root/boot/vmlinuz-* | head -n1)
  if [ ! -f "$config" ] || [ ! -f "$vmlinuz" ]; then
    echo "no kernel or config in $pkg" >&2
    return 1
  fi
  cp "$vmlinuz" "$dst/vmlinuz"
  cp "$config" "$dst/config"
  echo "$pkg" > "$dst/package"
  local opt
  for opt in VIRTIO VIRTIO_PCI FUSE_FS VIRTIO_FS; do
    echo "CONFIG_$opt=$(config_value "$config" "$opt")" >&2
  done
  resolve_modules "$dst/root" "$dst"
  echo "modules to load: $(tr '\n' ' ' < "$dst/modules/modules.order")" >&2
  # The unpacked package is large and only vmlinuz + the needed modules are used.
  rm -rf "$dst/root" "$WORK/$name.deb"
  echo "$TREE_VERSION" > "$dst/.done"
}

fetch_61() {
  fetch_tree k61 "" linux-image-amd64
}

fetch_612() {
  local apt=$WORK/trixie-apt
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  echo 'deb http://deb.debian.org/debian trixie main' > "$apt/sources.list"
  local opts="-o Dir::Etc::sourcelist=$apt/sources.list -o Dir::Etc::sourceparts=/dev/null"
  opts+=" -o Dir::State::Lists=$apt/lists -o Dir::Cache=$apt/cache"
  if [ "$(cat "$WORK/k612/.done" 2>/dev/null)" != "$TREE_VERSION" ]; then
    # shellcheck disable=SC2086
    apt-get $opts update -qq
  fi
  fetch_tree k612 "$opts" linux-image-amd64
  # 6.12 must carry everything built in: the initramfs loads no module there.
  local opt
  for opt in VIRTIO VIRTIO_PCI FUSE_FS VIRTIO_FS; do
    if [ "$(config_value "$WORK/k612/config" "$opt")" != y ]; then
      echo "trixie kernel: CONFIG_$opt is not built in" >&2
      return 1
    fi
  done
}

if [ "$(cat "$WORK/k61/.done" 2>/dev/null)" != "$TREE_VERSION" ] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(61 612)
for t in "${targets[@]}"; do
  case $t in
    61) fetch_61 ;;
    612) fetch_612 ;;
    *) echo "unknown kernel '$t' (61 or 612)" >&2; exit 2 ;;
  esac
done
