"""DGC's step as a compiled kernel: the few passes over memory the torch ops take, fused.

:mod:`gradcomp._kernels` (the C file beside this one) is built on first use
with the system C compiler (``$CC``, else ``cc``; about a second), cached under
``$GRADCOMP_CACHE`` (default ``~/.cache/gradcomp``) by a hash of its source,
flags and CPU, and called through :mod:`ctypes`, which releases the GIL.  It
needs no torch headers; it runs its threads on the OpenMP runtime torch
already loaded.

Where it cannot be built (no compiler) :func:`library` warns once and returns
``None``, and the torch ops of :mod:`gradcomp.memory` and
:mod:`gradcomp.compressors.sparse`, which are also the reference the kernel is
tested against, do the same work.  ``GRADCOMP_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["library", "enabled", "SOURCE"]

SOURCE = Path(__file__).with_name("_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_i64, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "gc_steps": (_i64, [_ptr, _i64, _ptr, _f32, _int, _int, _int, _ptr, _f32, _ptr, _ptr, _ptr, _int, _ptr, _ptr,
                        _ptr, _ptr, _ptr, _ptr]),
    "gc_decompress": (_i64, [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr]),
}


def enabled() -> bool:
    """Whether the compiled kernel may be used.

    Returns:
        False when ``GRADCOMP_KERNELS=0`` asks for the torch ops, else True.
    """
    return os.environ.get("GRADCOMP_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), platform.machine().encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("GRADCOMP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "gradcomp")
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # ranks building at once each rename a whole file
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use (cached for the process, and on disk across processes).

    Returns:
        The loaded library, its functions' signatures set; ``None`` when :func:`enabled` is False, or (after
        one warning) where it cannot be built or loaded.
    """
    if not enabled():
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"gradcomp: DGC's compiled kernel is unavailable ({err}); using torch ops, which are slower",
                      RuntimeWarning, stacklevel=2)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def threads() -> int:
    """Threads for the kernel.

    Returns:
        torch's intra-op thread count (``torch.get_num_threads()``).
    """
    return torch.get_num_threads()
