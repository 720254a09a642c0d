"""One run per output folder: an exclusive lock on the folder, held for the whole run.

`hold_run_folder(folder, flag)` takes an advisory `flock` on the file `.edm2-run.lock` inside the folder
(creating the folder when needed) and writes its process id and host name there (a process id alone is
ambiguous on a shared file system). The folder may be writable by others: the lock file is opened
without following a symbolic link, and refused in one line when it is a link or anything but a regular
file of ours with a single name, so that nothing outside the folder is ever written through it. The kernel drops the lock when the
process ends, however it ends, so a run killed with SIGKILL never leaves a stale lock: the file may
remain, but the next run takes its lock again. A second run on the same folder is refused at once with
one line naming the folder and the holder's process id. Under torchrun only rank 0 takes the lock and
tells the other ranks whether it got it, so that every rank stops together when it did not.
The folder's stale temporaries (`edm2.fileio`) are removed once the lock is held: nobody else writes there.
"""

import contextlib
import errno
import fcntl
import os
import socket
import stat

from . import distributed
from .errors import EDM2Error
from .fileio import remove_stale_temporaries

LOCK_NAME = '.edm2-run.lock'


class FolderInUseError(EDM2Error):
    """Another live process holds the run lock of the output folder (or it cannot be taken)."""


def _holder(fd):
    """'process PID on HOST' (or 'process PID', as older versions wrote) of the lock file's content."""
    try:
        words = os.pread(fd, 300, 0).decode('utf-8', 'replace').split()
    except OSError:
        words = []
    if not words or not words[0].isdigit():
        return 'process unknown'
    return f'process {words[0]}' + (f' on {words[1]}' if len(words) > 1 else '')


def _open_lock(path, flag, folder):
    """A read-write descriptor of the lock file, created when missing; never through a symbolic link."""
    unsafe = (f'{flag} {folder}: {LOCK_NAME} there is {{}}; refusing to write through it (remove it if the '
              f'folder is yours)')
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FolderInUseError(unsafe.format(f'a symbolic link to {_link_target(path)}')) from None
        raise FolderInUseError(f'{flag} {folder}: cannot create the run lock {LOCK_NAME} there: '
                               f'{e.strerror or e}') from None
    info = os.fstat(fd)
    problem = ('not a regular file' if not stat.S_ISREG(info.st_mode) else
               f'a file with {info.st_nlink} names (a hard link)' if info.st_nlink != 1 else
               f'owned by another user (uid {info.st_uid})' if info.st_uid != os.geteuid() else None)
    if problem:
        os.close(fd)
        raise FolderInUseError(unsafe.format(problem))
    return fd


def _link_target(path):
    try:
        return os.readlink(path)
    except OSError:
        return 'somewhere'


def _acquire(folder, flag):
    """The open, locked descriptor of the lock file; raises FolderInUseError."""
    path = os.path.join(folder, LOCK_NAME)
    while True:
        fd = _open_lock(path, flag, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUseError(f'{flag} {folder} is in use by another run ({holder}); wait for it to '
                                   f'finish or choose another folder') from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise FolderInUseError(f'{flag} {folder}: cannot lock {LOCK_NAME}: {e.strerror or e}') from None
        # The previous holder unlinks the file when it finishes: the lock must be on the file still there.
        try:
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode(), 0)
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
