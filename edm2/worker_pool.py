"""An ordered map over worker processes with a bounded number of items in flight (dataset conversion).

`ordered_map(fn, items, workers, context)` yields fn(context, item) for each item, in the order of
`items`, computed by `workers` processes; `context` reaches each worker once (pickled at its start).
Items travel in chunks of `chunk` (fewer round trips), and at most `in_flight` chunks per worker are
submitted and not yet consumed, so memory stays bounded whatever the number of items, and `items` is
only advanced as results are consumed (a reader that yields file contents reads ahead by that window
only). With one worker everything runs in this process.

Workers are started with 'spawn' (nothing inherited from a parent that may hold threads or open
archives; as always with spawn, a script that runs a command at import must guard it with
`if __name__ == '__main__':`, since each worker imports the main script) and ignore Ctrl-C: the
parent receives it, cancels what is queued and waits for the items being computed. An exception
raised by `fn` is raised again by the iterator, as it would be in one process (when its chunk is
reached); a worker that dies (killed, out of memory) ends the map with a one-line `WorkerError`.
"""

import collections
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool

from .errors import EDM2Error

CHUNK = 4  # items per task
IN_FLIGHT = 3  # chunks per worker: one being computed, the rest queued so that no worker waits on the parent


class WorkerError(EDM2Error):
    """A worker process ended unexpectedly; one-line message."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on macOS / Windows
        return os.cpu_count() or 1


_worker = {}  # the function and context of this worker process


def _start_worker(fn, context):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down
    _worker.update(fn=fn, context=context)


def _call(chunk):
    return [_worker['fn'](_worker['context'], item) for item in chunk]


def _in_process(fn, items, context):
    for item in items:
        yield fn(context, item)


def _chunks(items, size):
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _in_workers(pool, items, window, chunk):
    pending = collections.deque()
    chunks = _chunks(items, chunk)
    for part in chunks:
        pending.append(pool.submit(_call, part))
        if len(pending) >= window:
            break
    while pending:
        try:
            results = pending.popleft().result()
        except BrokenProcessPool:
            raise WorkerError('a worker process ended unexpectedly (killed, or out of memory?)') from None
        for part in chunks:  # keep the window full: one new chunk per consumed one
            pending.append(pool.submit(_call, part))
            break
        yield from results


@contextlib.contextmanager
def ordered_map(fn, items, workers, context=None, in_flight=IN_FLIGHT, chunk=CHUNK):
    """Context manager yielding an iterator of fn(context, item) in the order of `items` (see the module
    docstring). `fn` must be a module-level function (workers import it by name); leaving the block
    early cancels the queued items and waits for the ones being computed, so no process outlives it."""
    if workers <= 1:
        yield _in_process(fn, items, context)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                                  initializer=_start_worker, initargs=(fn, context))
    try:
        yield _in_workers(pool, items, workers * in_flight, chunk)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
