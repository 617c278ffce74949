"""The BLAS thread pool, set at run time (``device.blas_threads``).

OpenBLAS reads ``OPENBLAS_NUM_THREADS`` once, when NumPy loads it; a daemon started by systemd,
a device run in-process by :func:`~unus_edge.simulation.simulate`, or a test, cannot count on the
variable having been set before that import. So the device sets the pool's size itself, through
OpenBLAS's own ``openblas_set_num_threads`` on the library NumPy already loaded.

Why it matters (measured, ``docs/engine.md``): with OpenBLAS's default of one thread per core,
several trainings on a loaded machine wait on each other's descheduled BLAS threads. Under 8
CPU burners on 2 cores the SSP rejoin test took 168 s with the default and 4.4 s with one thread
(5.5 s on the idle machine with the default).

Only OpenBLAS is handled (NumPy's wheels bundle it as ``scipy_openblas``; Debian's NumPy links
the system ``libopenblas``). Anything else (MKL, BLIS, Accelerate, the reference BLAS) is left
as it is and :func:`set_blas_threads` says so by returning ``False``.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["blas_threads", "set_blas_threads"]

logger = logging.getLogger("unus_edge.blas")

# The symbol names of the setters and getters, by the prefixes and suffixes builds use
# (scipy-openblas64 as in NumPy 2 wheels, scipy-openblas32, a system libopenblas64, libopenblas).
_PREFIXES = ("scipy_openblas", "openblas")
_SUFFIXES = ("64_", "", "_64_")


def _loaded_openblas() -> list[Path]:
    """The OpenBLAS shared libraries mapped into this process (Linux: ``/proc/self/maps``)."""
    import numpy  # noqa: F401  (loads NumPy's BLAS, if it is not loaded yet)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to find this way
        return []
    found: dict[str, Path] = {}
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "openblas" in Path(parts[5]).name.lower() and ".so" in parts[5]:
            found.setdefault(parts[5], Path(parts[5]))
    return list(found.values())


def _functions(verb: str) -> Iterator[ctypes._NamedFuncPointer]:
    """``openblas_<verb>_num_threads`` in every loaded OpenBLAS, under the first name it exports."""
    for path in _loaded_openblas():
        try:
            library = ctypes.CDLL(str(path))  # already mapped: dlopen returns the same handle
        except OSError as error:
            logger.debug("cannot open %s: %s", path, error)
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                function = getattr(library, f"{prefix}_{verb}_num_threads{suffix}", None)
                if function is not None:
                    yield function
                    break
            else:
                continue
            break


def set_blas_threads(count: int) -> bool:
    """Size the BLAS thread pool of this process to ``count`` threads; whether one was found.

    Process-wide: every thread's BLAS calls (all in-process devices, the aggregator's NumPy
    evaluation) share the pool.
    """
    if count < 1:
        raise ValueError(f"a BLAS thread count must be at least 1, not {count}")
    done = False
    for function in _functions("set"):
        function.argtypes = [ctypes.c_int]
        function.restype = None
        function(count)
        done = True
    if not done:
        logger.debug("no OpenBLAS in this process: BLAS threads left as they are")
    return done


def blas_threads() -> int | None:
    """The OpenBLAS thread pool's size, or ``None`` when no OpenBLAS is loaded."""
    for function in _functions("get"):
        function.argtypes = []
        function.restype = ctypes.c_int
        return int(function())
    return None
