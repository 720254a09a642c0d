"""Atomic file writing: outputs appear complete under their final name or not at all.

Every writer of the project goes through `atomic_path` / `atomic_write` (safetensors files through
`save_safetensors`, so that no library makes temporaries of its own). Temporaries are named
`.{final name}.edm2-{pid}-{host}{random}.tmp` beside the target (the final name shortened when needed, so
that the temporary's name stays within the 255-byte limit of file names), so that a later run can
recognise and remove those left by a process that was killed (`remove_stale_temporaries`), without
touching the temporaries of a process that is still running. A full disk is reported as a `NoSpaceError`
naming the file, after the partial temporary was removed.
"""

import contextlib
import errno
import os
import pathlib
import re
import secrets
import shutil
import socket
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


def _umask():
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
    tmp = None
    try:
        with reporting_full_disk(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_name(path)
            with open(tmp, 'xb'):
                pass
            yield str(tmp)
            fix_permissions(tmp)
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
        with open(tmp, mode) as f:
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
    text = json.dumps(header, separators=(',', ':')).encode()
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
