"""The CPU thread policy: how many threads torch computes with, chosen so that a busy machine cannot stall it.

torch's own default (one OpenMP thread per core, threads spinning while they wait for each other) collapses
when other processes hold the cores: on a 2-core machine with one CPU hog beside it, training steps of the
toy example ran 17x slower than on one thread (`python bench/threads.py`, table in docs/failure-behaviour.md).
So every command and the test suite use this policy:

* the thread count is, in this order: the value given (a command's `--threads N`), $EDM2_THREADS,
  $OMP_NUM_THREADS, else ONE thread. One thread cannot stall on other processes, is the fastest choice for
  the small CPU work of the tests and the toy example, and gives the same float32 summation order on every
  machine (a resumed CPU run stays bit-identical). `--threads 0` means one thread per CPU core.
* waiting OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless set), so that more
  than one thread degrades gracefully on a busy machine. OpenMP reads this variable once, when torch is
  imported: `prepare_environment()` must run first (edm2/commands/__init__.py and tests/conftest.py do).
* worker processes started later (dataset workers, torchrun ranks) inherit the count through
  $OMP_NUM_THREADS.

On a GPU the count only concerns the host side and matters little.
"""

import os

__all__ = ['DEFAULT_THREADS', 'prepare_environment', 'requested_threads', 'configure']

DEFAULT_THREADS = 1


def prepare_environment():
    """Make waiting OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, unless the user set it). Effective only
    before torch is first imported in this process; returns whether it was in time."""
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import sys
    return 'torch' not in sys.modules


def requested_threads(threads=None) -> int:
    """The thread count the policy picks: `threads`, else $EDM2_THREADS, else $OMP_NUM_THREADS, else
    DEFAULT_THREADS; 0 means one per CPU core. A malformed variable is ignored (the next one decides)."""
    candidates = [threads, os.environ.get('EDM2_THREADS'), os.environ.get('OMP_NUM_THREADS'), DEFAULT_THREADS]
    for value in candidates:
        try:
            count = int(value)
        except (TypeError, ValueError):
            continue
        if count >= 0:
            return count if count > 0 else (os.cpu_count() or 1)
    return DEFAULT_THREADS


def configure(threads=None) -> int:
    """Apply the policy to this process (torch.set_num_threads) and to the processes it starts later
    ($OMP_NUM_THREADS); returns the count."""
    prepare_environment()
    count = requested_threads(threads)
    os.environ['OMP_NUM_THREADS'] = str(count)
    import torch
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
