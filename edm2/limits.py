"""Limits checked before work: a number inside its meaningful range, a count whose items fit in memory, a
path the file system can hold. Plain functions returning an error text (or None), shared by the command
lines (which turn the text into a one-line error naming the flag) and by the library's own checks."""

import math
import os

from .fileio import NAME_MAX

SEED_MAX = 2 ** 63 - 1  # the largest seed, and the most seeds one list may hold (a signed 64-bit count)


def _bounds_text(lo, hi, lo_open, hi_open):
    left = '(' if lo_open else '['
    right = ')' if hi_open else ']'
    return f'{left}{"-inf" if lo is None else f"{lo:g}"}, {"inf" if hi is None else f"{hi:g}"}{right}'


def check_range(value, lo=None, hi=None, lo_open=False, hi_open=False):
    """Return an error text when `value` is not finite or outside the given bounds, else None."""
    if not math.isfinite(value):
        return f'must be a finite number, got {value}'
    if (lo is not None and (value < lo or (lo_open and value == lo))) or \
       (hi is not None and (value > hi or (hi_open and value == hi))):
        return f'must lie in {_bounds_text(lo, hi, lo_open, hi_open)}, got {value:g}'
    return None


def _read_number(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # 'max' (v2): no limit


def cgroup_memory_room(root='/sys/fs/cgroup', proc_cgroup='/proc/self/cgroup'):
    """Bytes this process's control group may still allocate (its memory limit less its usage, the
    smallest over the group and the groups above it), or None when no limit applies. Reads cgroup v2
    (memory.max, memory.current) and v1 (memory.limit_in_bytes, memory.usage_in_bytes); psutil does not
    see these limits, so in a container it would promise memory the kernel will not give."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    candidates = []  # (folder, limit file, usage file)
    for line in lines:
        _, controllers, path = (line.split(':', 2) + ['', ''])[:3]
        path = path.strip('/')
        if controllers == '':  # v2: "0::/path"
            candidates += [(os.path.join(root, path), 'memory.max', 'memory.current')]
        elif 'memory' in controllers.split(','):
            candidates += [(os.path.join(root, 'memory', path), 'memory.limit_in_bytes', 'memory.usage_in_bytes')]
    candidates += [(root, 'memory.max', 'memory.current'),  # a container sees its own group as the root
                   (os.path.join(root, 'memory'), 'memory.limit_in_bytes', 'memory.usage_in_bytes')]
    room = None
    for folder, limit_file, usage_file in candidates:
        while True:
            limit = _read_number(os.path.join(folder, limit_file))
            if limit is not None and limit < 2 ** 60:  # v1 writes a huge number for "no limit"
                usage = _read_number(os.path.join(folder, usage_file)) or 0
                room = max(limit - usage, 0) if room is None else min(room, max(limit - usage, 0))
            if os.path.normpath(folder) == os.path.normpath(root) or len(folder) <= len(root):
                break
            folder = os.path.dirname(folder)
    return room


def available_memory(device=None):
    """Bytes that new allocations can take now: the host's available memory (psutil), at most what the
    process's cgroup still allows (`cgroup_memory_room`), and for a CUDA `device` at most the device's free
    memory."""
    import psutil
    free = psutil.virtual_memory().available
    room = cgroup_memory_room()
    if room is not None:
        free = min(free, room)
    if device is not None and getattr(device, 'type', str(device).split(':')[0]) == 'cuda':
        import torch
        free = min(free, torch.cuda.mem_get_info(device)[0])
    return int(free)


def format_bytes(n):
    for unit, size in (('TB', 10 ** 12), ('GB', 10 ** 9), ('MB', 10 ** 6), ('kB', 10 ** 3)):
        if n >= size:
            return f'{n / size:.1f} {unit}'
    return f'{int(n)} bytes'


def memory_error(count, item_bytes, item='item', device=None, linear=True):
    """Why `count` items of `item_bytes` bytes each cannot fit in the memory available now, or None
    (`linear`: item_bytes does not grow with the count, so the largest count that fits can be named)."""
    item_bytes = max(int(item_bytes), 1)
    free = available_memory(device)
    if count * item_bytes <= free:
        return None
    most = f': at most {free // item_bytes}' if linear else ''
    return (f'{count} needs about {format_bytes(count * item_bytes)} of memory ({format_bytes(item_bytes)} per '
            f'{item}), but {format_bytes(free)} is available{most}')


PATH_MAX = 4095  # bytes in a whole path given to the kernel (NAME_MAX, from edm2.fileio: bytes in one name)


def path_problem(path):
    """Why the file system cannot hold `path` as an output, or None: a name longer than NAME_MAX bytes, a
    whole path longer than PATH_MAX, or a symbolic link to nothing (itself or a folder above it)."""
    path = os.path.abspath(os.fspath(path))
    for name in path.split(os.sep):
        if len(os.fsencode(name)) > NAME_MAX:
            return (f'the name {name[:24]}... is {len(os.fsencode(name))} bytes long; a file or folder name '
                    f'holds at most {NAME_MAX}')
    if len(os.fsencode(path)) > PATH_MAX:
        return f'the path is {len(os.fsencode(path))} bytes long; at most {PATH_MAX} are possible'
    part = path
    while part != os.path.dirname(part):
        if os.path.islink(part) and not os.path.exists(part):
            return f'{part} is a symbolic link to {os.readlink(part)}, which does not exist'
        part = os.path.dirname(part)
    return None
