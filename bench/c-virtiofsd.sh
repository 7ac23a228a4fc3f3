#!/bin/sh
# QEMU's C virtiofsd, started with the option spelling the bench runners append
# (--socket-path=S --shared-dir=D).  It has no sandbox=none: chroot is its lightest mode.
sock=
dir=
for a in "$@"; do
  case $a in
    --socket-path=*) sock=${a#*=} ;;
    --shared-dir=*) dir=${a#*=} ;;
    *) echo "c-virtiofsd.sh: unexpected option $a" >&2; exit 2 ;;
  esac
done
exec "${C_VIRTIOFSD:-/usr/lib/qemu/virtiofsd}" --socket-path="$sock" -o source="$dir" \
  -o cache=auto -o sandbox=chroot
