#!/bin/bash
# Installs the two daemons pyvirtiofsd is compared with, from Debian's packages only:
#   QEMU's C virtiofsd    bookworm's qemu-system-common: /usr/lib/qemu/virtiofsd
#   the Rust virtiofsd    trixie's virtiofsd 1.13, unpacked (never installed) under PREFIX/rs
#                         with trixie's own libc, and started through that libc's loader by
#                         the wrapper PREFIX/virtiofsd-rs.
# Usage: scripts/install-anchors.sh [PREFIX]   (default /opt/anchors).  Safe to run again.
set -euo pipefail
PREFIX=${1:-/opt/anchors}

if [ ! -x /usr/lib/qemu/virtiofsd ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-common >/dev/null
fi

rs=$PREFIX/rs
if [ ! -e "$rs/.done" ]; then
    rm -rf "$rs"
    mkdir -p "$rs/lists/partial" "$rs/cache/archives/partial" "$rs/debs" "$rs/root"
    echo 'deb http://deb.debian.org/debian trixie main' >"$rs/sources.list"
    # A private package list: the host's apt configuration and state stay bookworm's.
    apt_opts=(-o "Dir::Etc::sourcelist=$rs/sources.list" -o Dir::Etc::sourceparts=/dev/null
              -o "Dir::State::Lists=$rs/lists" -o "Dir::Cache=$rs/cache")
    apt-get "${apt_opts[@]}" update -qq
    # apt downloads as its own user where it can write.
    chown _apt "$rs/debs" 2>/dev/null || true
    (cd "$rs/debs" && apt-get "${apt_opts[@]}" download \
        virtiofsd libc6 libseccomp2 libcap-ng0 libgcc-s1 >/dev/null)
    for deb in "$rs"/debs/*.deb; do
        dpkg-deb -x "$deb" "$rs/root"
    done
    lib=$rs/root/usr/lib/x86_64-linux-gnu
    cat >"$PREFIX/virtiofsd-rs" <<EOF
#!/bin/sh
exec $lib/ld-linux-x86-64.so.2 --library-path $lib $rs/root/usr/libexec/virtiofsd "\$@"
EOF
    chmod +x "$PREFIX/virtiofsd-rs"
    "$PREFIX/virtiofsd-rs" --version >/dev/null
    touch "$rs/.done"
fi
echo "rust: $PREFIX/virtiofsd-rs ($("$PREFIX/virtiofsd-rs" --version | head -n 1))"
echo "c:    /usr/lib/qemu/virtiofsd"
