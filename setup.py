# The native helpers (memory fences, atomics, the shared-arena lock, credential switching) and
# the native request engine (worker/engine.c) are built with cffi at install time; everything
# else is declared in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["common/native_build.py:ffi", "worker/engine_build.py:ffi"])
