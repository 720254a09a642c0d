"""One run per output folder: an exclusive lock on the folder, held for the whole run.

`hold_run_folder(folder, flag)` takes an advisory `flock` on the file `.edm2-run.lock` inside the folder
(creating the folder when needed) and writes its process id there. The kernel drops the lock when the
process ends, however it ends, so a run killed with SIGKILL never leaves a stale lock: the file may
remain, but the next run takes its lock again. A second run on the same folder is refused at once with
one line naming the folder and the holder's process id. Under torchrun only rank 0 takes the lock and
tells the other ranks whether it got it, so that every rank stops together when it did not.
The folder's stale temporaries (`edm2.fileio`) are removed once the lock is held: nobody else writes there.
"""

import contextlib
import fcntl
import os

from . import distributed
from .errors import EDM2Error
from .fileio import remove_stale_temporaries

LOCK_NAME = '.edm2-run.lock'


class FolderInUseError(EDM2Error):
    """Another live process holds the run lock of the output folder (or it cannot be taken)."""


def _holder(fd):
    try:
        text = os.pread(fd, 32, 0).decode('ascii', 'replace').strip()
    except OSError:
        return 'unknown'
    return text if text.isdigit() else 'unknown'


def _acquire(folder, flag):
    """The open, locked descriptor of the lock file; raises FolderInUseError."""
    path = os.path.join(folder, LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise FolderInUseError(f'{flag} {folder}: cannot create the run lock {LOCK_NAME} there: '
                                   f'{e.strerror or e}') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise FolderInUseError(f'{flag} {folder} is in use by another run (process {pid}); wait for it to '
                                   f'finish or choose another folder') from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise FolderInUseError(f'{flag} {folder}: cannot lock {LOCK_NAME}: {e.strerror or e}') from None
        # The previous holder unlinks the file when it finishes: the lock must be on the file still there.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    return fd


@contextlib.contextmanager
def hold_run_folder(folder, flag='--outdir'):
    """Hold the run lock of `folder` for the block (see the module docstring); raises FolderInUseError on
    every rank when rank 0 could not take it. Yields the stale temporaries removed (rank 0; [] elsewhere).
    A folder created here and still empty at the end is removed."""
    folder = os.path.abspath(os.fspath(folder))
    fd, created, error, removed = None, False, [None], []
    if distributed.is_main():
        try:
            created = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            fd = _acquire(folder, flag)
            removed = remove_stale_temporaries(folder)
        except FolderInUseError as e:
            error[0] = str(e)
        except OSError as e:
            error[0] = f'{flag} {folder}: cannot create the folder: {e.strerror or e}'
    if distributed.get_world_size() > 1:
        import torch.distributed
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise FolderInUseError(error[0])
    try:
        yield removed
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, LOCK_NAME))  # while locked: see _acquire
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only succeeds when nothing was written
