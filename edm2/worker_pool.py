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
reached); one whose class does not survive pickling arrives as a `WorkerError` holding `Type: message`
as plain text, prefixed by what `describe(context, item)` says of the item (e.g. the file); a worker that
dies (killed, out of memory) ends the map with a one-line `WorkerError`.

No worker outlives its parent: each watches the parent's sentinel (a pipe that only the parent holds
open) from a thread and exits when it closes, however the parent ended (SIGKILL included); on Linux the
kernel's parent-death signal (prctl PR_SET_PDEATHSIG) is a second line. Once the workers are gone,
multiprocessing's resource tracker, which they kept open too, ends by itself.

`worker_count(requested, items)` prices a worker count: never more workers than chunks of work, nor more
than MAX_WORKERS_PER_CORE per usable core (an idle worker still costs a process and its memory).
"""

import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
from concurrent.futures.process import BrokenProcessPool

from .errors import EDM2Error, one_line

CHUNK = 4  # items per task
IN_FLIGHT = 3  # chunks per worker: one being computed, the rest queued so that no worker waits on the parent
MAX_WORKERS_PER_CORE = 2  # beyond this, workers only wait for a core and hold memory
WORKER_BYTES = 64 << 20  # a worker process's own memory (interpreter, libraries, an image or two): a lower estimate
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerError(EDM2Error):
    """A worker process ended unexpectedly; one-line message."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on macOS / Windows
        return os.cpu_count() or 1


def worker_count(requested, items, chunk=CHUNK) -> int:
    """The workers worth starting for `items` items: at most one per chunk of work and MAX_WORKERS_PER_CORE
    per usable core, at least 1."""
    return max(1, min(requested, -(-items // chunk), MAX_WORKERS_PER_CORE * usable_cores()))


_worker = {}  # the function and context of this worker process


def _die_with_parent(parent):
    """Exit this process as soon as `parent` (multiprocessing's handle of it) ends."""
    if sys.platform.startswith('linux'):  # second line: the kernel kills us when the parent dies
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent.pid:  # it died before the request took effect
            os._exit(1)

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=watch, name='edm2-parent-watch', daemon=True).start()


def _start_worker(fn, context, describe):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down
    parent = multiprocessing.parent_process()
    if parent is not None:
        _die_with_parent(parent)
    _worker.update(fn=fn, context=context, describe=describe)


def _portable(error, item):
    """`error` when it survives pickling (the parent raises it as it is), else a `WorkerError` with its type
    and message as plain text, naming the item (`describe`)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 -- any failure to pickle or unpickle
        pass
    describe = _worker.get('describe')
    where = f'{describe(_worker["context"], item)}: ' if describe is not None else ''
    return WorkerError(f'{where}{type(error).__name__}: {one_line(error)}')


def _call(chunk):
    results = []
    for item in chunk:
        try:
            results.append(_worker['fn'](_worker['context'], item))
        except Exception as e:
            portable = _portable(e, item)
            if portable is e:
                raise
            raise portable from None
    return results


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
def ordered_map(fn, items, workers, context=None, in_flight=IN_FLIGHT, chunk=CHUNK, describe=None):
    """Context manager yielding an iterator of fn(context, item) in the order of `items` (see the module
    docstring). `fn` (and `describe`) must be module-level functions (workers import them by name); leaving
    the block early cancels the queued items and waits for the ones being computed, so no process outlives
    it."""
    if workers <= 1:
        yield _in_process(fn, items, context)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                                  initializer=_start_worker, initargs=(fn, context, describe))
    try:
        yield _in_workers(pool, items, workers * in_flight, chunk)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
