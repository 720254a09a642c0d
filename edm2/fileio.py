"""Atomic file writing: outputs appear complete under their final name or not at all (DESIGN.md)."""

import contextlib
import os
import pathlib
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, else delete it.

    The temporary file exists (empty) when the block starts and gets the permissions a plain `open`
    would give (mkstemp alone would leave it readable by its owner only).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
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
