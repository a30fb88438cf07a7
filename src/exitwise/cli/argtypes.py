"""argparse ``type=`` checkers for numeric flags: every number is range-checked while the flags are
parsed, before any model, database or file is touched, and a bad one is one line naming the flag
(argparse adds it), the value and the limit.

Limits that depend on the machine (memory, cores) are read when the parser is built; limits that
depend on an artefact (``raee eval --k`` against a database's rows) are checked by the command right
after it opens the artefact, before the model loads.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

# --threads: past a few threads per core, torch only adds contention (and an OpenMP pool of 10^9
# threads would exhaust the machine before it ran anything).
THREADS_PER_CORE = 4


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse prints "invalid <name> value" if a checker ever raises ValueError
    return fn


def int_range(lo: int | None = None, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An integer in [lo, hi] (either end open when None); ``what`` names the upper limit's source."""

    def check(text: str) -> int:
        value = _int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
            if lo is None:
                raise argparse.ArgumentTypeError(f"must be <= {hi}{what}, got {value}")
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}{what}, got {value}")
        return value

    return _named(check, "int")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return int_range(1)(text)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return int_range(0)(text)


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """A finite number between lo and hi (each end closed unless ``*_open``; None: unbounded)."""

    def check(text: str) -> float:
        value = _float(text)
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            if hi is None:
                raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {text}")
            if lo is None:
                raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi:g}, got {text}")
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo:g}, {hi:g}{right}, got {text}")
        return value

    return _named(check, "float")


def finite_float(text: str) -> float:
    """Any finite number (no nan, inf)."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return float_range(0.0, lo_open=True)(text)


def memory_mb() -> int | None:
    """This machine's physical memory in MiB, None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError, AttributeError):
        return None


def memory_mb_arg(text: str) -> int:
    """A size in MiB, >= 1 and at most the machine's memory."""
    total = memory_mb()
    return int_range(1, total, " (this machine's memory in MiB)" if total else "")(text)


def threads_arg(text: str) -> int:
    """Thread count: 1 .. THREADS_PER_CORE x the cores."""
    cores = os.cpu_count() or 1
    return int_range(1, THREADS_PER_CORE * cores, f" ({THREADS_PER_CORE} x the {cores} cores)")(text)


def port_arg(text: str) -> int:
    """A TCP port, 0 (any free port) .. 65535."""
    return int_range(0, 65535)(text)


def seed_arg(text: str) -> int:
    """A random seed: 0 .. 2^64 - 1 (what numpy and torch take)."""
    return int_range(0, (1 << 64) - 1)(text)


non_negative_float = _named(float_range(0.0), "float")
# a level strictly between 0 and 1 (agreement targets, risk levels)
open_unit = _named(float_range(0.0, 1.0, lo_open=True, hi_open=True), "float")
