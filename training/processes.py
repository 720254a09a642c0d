"""How the processes of a run end: stop signals, DataLoader workers, and a failed peer under torchrun.

SIGINT / SIGTERM let the step in progress finish (then a checkpoint is written); an error shuts the
data workers down at once, so that the interpreter never waits on them at exit.
"""

import re
import signal
import threading

import torch
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from edm2.errors import one_line


def ignore_stop_signals(_worker_id):
    # Ctrl-C reaches the whole process group, and torchrun sends SIGTERM to each rank's group: the main
    # process handles both (checkpoint, then clean exit) and shuts its workers down itself
    # (`shut_down_workers`). Workers whose main process dies exit on their own (DataLoader's watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shut_down_workers(data_iter):
    """Stop the DataLoader's workers now. Left to garbage collection, an exception's traceback keeps the
    iterator alive, and at exit the interpreter would SIGTERM (ignored, see above) and wait forever."""
    if isinstance(data_iter, _MultiProcessingDataLoaderIter):
        data_iter._shutdown_workers()
        for worker in data_iter._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


def worker_error_text(error):
    """One line for an error raised in a DataLoader worker (re-raised with the worker's traceback as
    its text): the original message without its exception class."""
    return re.sub(r'^[\w.]+(Error|Exception): ', '', one_line(error))


def peer_failed(error):
    """Whether a collective failed because another process of the job went away (gloo raises a plain
    RuntimeError saying so; newer backends raise DistError)."""
    return isinstance(error, torch.distributed.DistError) or bool(
        re.search(r'closed by peer|Connection reset|remote worker', str(error)))


class StopFlag:
    """Records SIGINT / SIGTERM instead of dying, so that the step in progress can finish."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
