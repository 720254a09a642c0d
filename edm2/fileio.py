"""Atomic file writing: outputs appear complete under their final name or not at all.

Every writer of the project goes through `atomic_path` / `atomic_write`. Temporaries are named
`.{final name}.edm2-{pid}-{random}.tmp` beside the target, so that a later run can recognise and
remove those left by a process that was killed (`remove_stale_temporaries`), without touching the
temporaries of a process that is still running.
"""

import contextlib
import os
import pathlib
import re
import secrets
import shutil
import socket
import zlib

_TEMP_RE = re.compile(r'^\..+\.edm2-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})[0-9a-f]*\.tmp$')
_HOST = format(zlib.crc32(socket.gethostname().encode()), '08x')


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(path) -> pathlib.Path:
    """A fresh temporary path beside `path`, in the recognisable pattern described above."""
    path = pathlib.Path(path)
    return path.with_name(f'.{path.name}.edm2-{os.getpid()}-{_HOST}{secrets.token_hex(4)}.tmp')


def fix_permissions(path):
    """Give `path` the permissions a plain `open` would (0666 minus the umask); writers that create
    their own file under our temporary name (e.g. safetensors) call this before the rename."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, else delete it.

    The temporary file exists (empty) when the block starts; the final file gets umask permissions even
    when the block replaced the temporary file with one of its own.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, 'xb'):
            pass
        yield str(tmp)
        fix_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode='wb', fsync=False):
    """open()-like context manager writing `path` atomically (see atomic_path); `fsync` forces the
    data to disk before the rename (for checkpoints that must survive a crash)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def atomic_write_text(path, text):
    """Write the string `text` to `path` atomically (see atomic_path)."""
    with atomic_write(path, 'w') as f:
        f.write(text)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder) -> list:
    """Delete the temporaries in `folder` left by killed processes of this host (their pid is gone);
    return the removed paths. Temporaries of live processes and of other hosts are left alone."""
    removed = []
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if not m or m['host'] != _HOST or _process_alive(int(m['pid'])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
