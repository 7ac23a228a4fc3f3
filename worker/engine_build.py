r"""cffi build script for the native request engine (worker/engine.c + common/state.c).

setup.py builds `pyvirtiofsd.worker._engine` with the hardening flags below.  The same sources
build a second module, `pyvirtiofsd.worker._engine_asan`, under AddressSanitizer and
UndefinedBehaviorSanitizer for the fuzzers:

    python worker/engine_build.py --sanitize      # builds _engine_asan next to _engine
    PYVIRTIOFSD_ENGINE=asan LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
        ASAN_OPTIONS=detect_leaks=0 python -m pytest ...

worker/engine.py imports the module PYVIRTIOFSD_ENGINE names (unset or "default": _engine).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_COMMON = os.path.join(os.path.dirname(_HERE), "common")

def engine_cdef() -> str:
    """engine.h as cffi's cdef reads it, so the declarations are written once: its integer
    #defines kept, its other preprocessor lines dropped, `1u << n` written as the number
    (cffi's parser takes no integer suffix), and the types it borrows declared here: the
    shared-state structs opaque, struct iovec as <sys/uio.h> lays it out."""
    lines = ["struct vfs_jq;", "struct vfs_arena;",
             "struct iovec { void *iov_base; size_t iov_len; };"]
    with open(os.path.join(_HERE, "engine.h"), encoding="utf-8") as f:
        for line in f:
            text = line.lstrip()
            if text.startswith("#") and not _INT_DEFINE.match(text):
                continue
            lines.append(_SHIFT.sub(lambda m: str(int(m[1]) << int(m[2])), line.rstrip("\n")))
    return "\n".join(lines) + "\n"


_INT_DEFINE = re.compile(r"#define\s+\w+\s+\d+\b")
_SHIFT = re.compile(r"\b(\d+)u << (\d+)\b")
CDEF = engine_cdef()

_HARDENING = ["-O2", "-D_FORTIFY_SOURCE=3", "-fstack-protector-strong", "-fno-strict-aliasing",
              "-Wall", "-Wextra", "-Werror"]
# -fno-wrapv undoes the -fwrapv CPython's flags bring, which would hide signed overflow from
# UBSan.
_SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=undefined", "-fno-wrapv"]


def make_ffi(sanitize: bool = False, absolute: bool = False) -> FFI:
    """The engine module; with `sanitize`, the ASan/UBSan build used by the fuzzers.  Source
    paths are relative to the project (setup.py wants them so) unless `absolute`."""
    where = (lambda p: p) if absolute else os.path.relpath
    ffi = FFI()
    ffi.cdef(CDEF)
    name = "pyvirtiofsd.worker._engine_asan" if sanitize else "pyvirtiofsd.worker._engine"
    flags = _HARDENING + (_SANITIZE if sanitize else [])
    ffi.set_source(
        name,
        '#include "engine.h"\n',
        sources=[where(os.path.join(_HERE, "engine.c")), where(os.path.join(_COMMON, "state.c"))],
        include_dirs=[_HERE, _COMMON],
        extra_compile_args=flags,
        extra_link_args=["-fsanitize=address,undefined"] if sanitize else [],
    )
    return ffi


ffi = make_ffi(sanitize=False)

def build_in_place(sanitize: bool) -> str:
    """Compile next to this file (the editable install's package directory); the module path."""
    with tempfile.TemporaryDirectory() as tmp:
        built = make_ffi(sanitize, absolute=True).compile(tmpdir=tmp, verbose=False)
        dest = os.path.join(_HERE, os.path.basename(built))
        shutil.move(built, dest)
    return dest


if __name__ == "__main__":
    print(build_in_place("--sanitize" in sys.argv[1:]))
