"""Atomic file writing: outputs appear complete under their final name or not at all.

Every writer of the project goes through `atomic_path` / `atomic_write` (safetensors files through
`save_safetensors`, so that no library makes temporaries of its own). Temporaries are named
`.{final name}.edm2-{pid}-{host}{random}.tmp` beside the target (the final name shortened when needed, so
that the temporary's name stays within the 255-byte limit of file names), so that a later run can
recognise and remove those left by a process that was killed (`remove_stale_temporaries`), without
touching the temporaries of a process that is still running. A full disk is reported as a `NoSpaceError`
naming the file, after the partial temporary was removed.

Output folders may be writable by others: no file is ever written through a symbolic link planted there.
Temporaries are created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW), reopened only with O_NOFOLLOW
(`open_temporary`), and checked to be still the regular file created before they are renamed into place
(`UnsafePathError` otherwise); a file created outside `atomic_path` goes through `create_new`, a log
appended to through `open_append`.
"""

import contextlib
import errno
import os
import pathlib
import re
import secrets
import shutil
import socket
import stat
import zlib

from .errors import EDM2Error

# The host tag is the first 4 hex digits of a CRC of the host name (older versions wrote all 8, then 8
# random digits: their temporaries still match); 6 random hex digits follow.
_TEMP_RE = re.compile(r'^\..+\.edm2-(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]*\.tmp$')
_HOST = format(zlib.crc32(socket.gethostname().encode()), '08x')[:4]
NAME_MAX = 255  # bytes in one file name on the file systems in use (ext4, xfs, btrfs, tmpfs, NFS)
_NO_SPACE = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'no space left (disk quota exceeded)'}


class NoSpaceError(EDM2Error):
    """A write failed because the disk (or the user's quota) is full; the message names the file."""


class UnsafePathError(EDM2Error):
    """A path we write was replaced by a symbolic link or another kind of file; nothing was written through it."""


def no_space_text(path) -> str:
    """The one-line report of a full disk while writing `path`."""
    return f'{path}: no space left on the device; the partial file was removed (free some space and run again)'


@contextlib.contextmanager
def reporting_full_disk(path):
    """Turn an OSError of a full disk (ENOSPC, EDQUOT) inside the block into a `NoSpaceError` naming `path`
    (file writes report no file name of their own); other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise NoSpaceError(no_space_text(path)) from e
        raise


def umask():
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(path) -> pathlib.Path:
    """A fresh temporary path beside `path`, in the recognisable pattern described above."""
    path = pathlib.Path(path)
    suffix = f'.edm2-{os.getpid()}-{_HOST}{secrets.token_hex(3)}.tmp'
    name = path.name
    room = NAME_MAX - 1 - len(suffix)
    if len(name.encode()) > room:  # a name near the limit: keep its start (any characters, cut whole)
        name = name.encode()[:room].decode(errors='ignore') or 'x'
    return path.with_name(f'.{name}{suffix}')


def opener(extra, dir_fd=None):
    """An `opener` for the built-in `open` that adds the flags `extra` (e.g. O_NOFOLLOW), optionally relative
    to the folder descriptor `dir_fd`. Files are opened through `open`, never os.fdopen, so that every
    writer can be watched the same way (the tests' full-disk simulation patches `open`)."""
    return lambda path, flags: os.open(path, flags | extra | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)


def create_new(path, mode='wb', dir_fd=None):
    """Open a new file `path` for writing; fails (FileExistsError) when anything exists there, a symbolic
    link included, so that nothing is written through a link planted by someone else."""
    return open(path, mode, opener=opener(os.O_EXCL | os.O_NOFOLLOW, dir_fd))


def open_append(path, encoding='utf-8'):
    """Open the text file `path` for appending (created when missing), refusing a symbolic link or anything
    but a regular file there (UnsafePathError): logs kept in an output folder others may write into."""
    try:
        f = open(path, 'a', encoding=encoding, opener=opener(os.O_NOFOLLOW | os.O_NONBLOCK))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f'{path}: is a symbolic link; refusing to write through it') from None
        if e.errno == errno.ENXIO:  # a FIFO without a reader
            raise UnsafePathError(f'{path}: is not a regular file; refusing to write to it') from None
        raise
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise UnsafePathError(f'{path}: is not a regular file; refusing to write to it')
    return f


def open_temporary(tmp, mode='wb'):
    """Open the temporary yielded by `atomic_path` for writing (truncated), without following a symbolic
    link put in its place: a writer that can take a file object opens it through here."""
    try:
        return open(tmp, mode, opener=opener(os.O_NOFOLLOW))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f'{tmp}: was replaced by a symbolic link; nothing was written through it') from None
        raise


def _regular_file_fd(path):
    """A read-only descriptor of `path` when it is a regular file (not a link, not a FIFO), else UnsafePathError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f'{path}: was replaced by a symbolic link') from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f'{path}: is no longer a regular file')
    return fd


def fix_permissions(path):
    """Give `path` the permissions a plain `open` would (0666 minus the umask); writers that create
    their own file under our temporary name (e.g. safetensors) call this before the rename. A symbolic
    link found there is refused (UnsafePathError), never followed."""
    fd = _regular_file_fd(path)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, else delete it.

    The temporary file exists (empty) when the block starts; the final file gets umask permissions even
    when the block replaced the temporary file with one of its own.
    """
    path = pathlib.Path(path)
    tmp = None
    try:
        with reporting_full_disk(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_name(path)
            create_new(tmp).close()
            yield str(tmp)
            fix_permissions(tmp)  # also refuses a temporary replaced by a link
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode='wb', fsync=False):
    """open()-like context manager writing `path` atomically (see atomic_path); `fsync` forces the
    data to disk before the rename (for checkpoints that must survive a crash)."""
    with atomic_path(path) as tmp:
        with open_temporary(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format").
_SAFETENSORS_DTYPES = {
    'float64': 'F64', 'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16', 'int64': 'I64', 'int32': 'I32',
    'int16': 'I16', 'int8': 'I8', 'uint8': 'U8', 'bool': 'BOOL', 'float8_e4m3fn': 'F8_E4M3', 'float8_e5m2': 'F8_E5M2',
}


def save_safetensors(path, tensors, metadata=None, fsync=False):
    """Write a dict of CPU tensors as a safetensors file, atomically (see atomic_path), streamed: the JSON
    header first, then each tensor's bytes straight from its memory, so that writing holds no copy of the
    file (safetensors' `save` builds the whole file in memory, one network more at the peak; its `save_file`
    makes a temporary of its own beside the target, which a killed process would leave behind).

    The layout is the safetensors format: an 8-byte little-endian header size, the JSON header (tensor name
    -> dtype, shape, data_offsets; "__metadata__": string -> string) padded with spaces to a multiple of 8,
    then the tensors' bytes back to back in the header's order."""
    import json
    import struct

    import torch
    header, order, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or t.device.type != 'cpu':
            raise ValueError(f'save_safetensors: {name} is not a CPU tensor')
        dtype = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix('torch.'))
        if dtype is None:
            raise ValueError(f'save_safetensors: {name} has dtype {t.dtype}, which safetensors cannot store')
        size = t.numel() * t.element_size()
        header[name] = {'dtype': dtype, 'shape': list(t.shape), 'data_offsets': [offset, offset + size]}
        order.append(name)
        offset += size
    if metadata:
        header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(',', ':'), allow_nan=False).encode()
    text += b' ' * (-len(text) % 8)
    with atomic_write(path, fsync=fsync) as f:
        f.write(struct.pack('<Q', len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


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


def is_complete_png(path):
    """--skip-existing: whether `path` holds a PNG that decodes in full. A zero-byte, truncated or corrupt
    file (e.g. from a disk that filled up or a copy cut short) is not an existing image: it is generated
    again."""
    import PIL.Image
    try:
        with PIL.Image.open(path) as image:
            if image.format != 'PNG':
                return False
            image.load()  # decodes every row: a truncated stream raises here
        return True
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError):
        return False
