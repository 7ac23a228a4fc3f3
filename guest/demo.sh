#!/bin/bash
# Demo: a Debian guest under QEMU mounts a host directory served by pyvirtiofsd, lists it,
# writes a file, and the host reads that file back.
#   bash guest/demo.sh
# Environment: DAEMON="command args" replaces the daemon (default .venv/bin/pyvirtiofsd; it gets
# --socket-path=... --shared-dir=... appended), DEMO_DIR (default /tmp/pyvirtiofsd-demo).
# Needs root, qemu-system-x86_64 and busybox-static; the first run downloads Debian's kernel.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DAEMON=${DAEMON:-$ROOT/.venv/bin/pyvirtiofsd}
DEMO_DIR=${DEMO_DIR:-/tmp/pyvirtiofsd-demo}
SHARE=$DEMO_DIR/share

fail() {
  echo "Demo failed: $*" >&2
  exit 1
}

read -r -a daemon_argv <<< "$DAEMON"
[ "$(id -u)" -eq 0 ] || fail "run it as root (the daemon serves files of any owner)"
command -v qemu-system-x86_64 >/dev/null \
  || fail "qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"
[ -x "${daemon_argv[0]}" ] || command -v "${daemon_argv[0]}" >/dev/null \
  || fail "no daemon at ${daemon_argv[0]} (install the project first, or set DAEMON=...)"
PYTHON=python3
[ -x "$ROOT/.venv/bin/python" ] && PYTHON=$ROOT/.venv/bin/python

echo "Creating a demo share in $SHARE with a couple of files"
rm -rf "$SHARE"
mkdir -p "$SHARE/photos"
printf 'This directory lives on the host.\n' > "$SHARE/README.txt"
printf '1\n2\n3\n' > "$SHARE/numbers.txt"
: > "$SHARE/photos/cat.jpg"

if [ ! -e "$ROOT/guest/work/k61/.done" ]; then
  echo "Fetching Debian 12's kernel package (once, about 70 MB)..."
  bash "$ROOT/guest/fetch-kernels.sh" 61 || fail "could not fetch the guest kernel"
fi
bash "$ROOT/guest/build-initramfs.sh" "$ROOT/guest/work/k61" "$ROOT/guest/work/k61/initramfs.gz" \
  || fail "could not build the guest's initramfs"

# What the guest runs once it has mounted the share at /mnt.
SCRIPT=$DEMO_DIR/guest-script.sh
cat > "$SCRIPT" <<'GUEST'
echo "## ls"
ls -l /mnt
echo "## cat"
cat /mnt/README.txt
echo "## write"
echo "Hello from the guest (Linux $(uname -r))" > /mnt/hello-from-guest.txt && echo ok
GUEST

OUT=$DEMO_DIR/guest-output.txt
if ! "$PYTHON" "$ROOT/guest/run.py" --kernel 61 --share "$SHARE" --script "$SCRIPT" \
       --timeout 120 --progress -- "${daemon_argv[@]}" > "$OUT"; then
  fail "the guest run did not complete (details above)"
fi

section() {
  awk -v s="## $1" '$0 == s { on = 1; next } /^## / { on = 0 } on { print "    " $0 }' "$OUT"
}
echo "Guest listed the share:"
section ls
echo "Guest read README.txt:"
section cat
[ "$(section write)" = "    ok" ] || fail "the guest could not write hello-from-guest.txt"
[ -f "$SHARE/hello-from-guest.txt" ] || fail "the host does not see hello-from-guest.txt"
echo "Host sees the guest's file $SHARE/hello-from-guest.txt:"
sed 's/^/    /' "$SHARE/hello-from-guest.txt"
echo "Done."
