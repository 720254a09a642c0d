"""Shared pieces of the command lines: validated click parameter types, list parsing, one-line errors.

Every numeric flag is checked finite and inside its meaningful range by click, before any work
starts, so that e.g. `--sigma_max inf` or `--lr nan` is refused with one line naming the flag. A count or
size flag also declares the memory one unit of it takes (`Int(item_bytes=...)`): a value whose items
cannot fit in the memory available now is refused the same way (`check_memory`), before work starts.
"""

import functools
import math
import os
from decimal import Decimal, InvalidOperation

import click

from .errors import EDM2Error, one_line
from .fileio import NAME_MAX


def fail(error, prefix=None):
    """Raise a one-line `click.ClickException` from an exception or a message (optionally prefixed by
    the flag or file it concerns)."""
    msg = one_line(error)
    raise click.ClickException(f'{prefix}: {msg}' if prefix else msg)


def fail_once(error, prefix=None):
    """`fail` for an error every process of a torchrun job meets (e.g. agreed by broadcast): rank 0 prints
    the line, the other ranks leave with status 1 silently."""
    if int(os.environ.get('RANK', 0)) == 0:
        fail(error, prefix)
    raise SystemExit(1)


def one_line_errors(command):
    """Decorator of a command function: an `EDM2Error` that escapes it (bad input, named in its message)
    becomes a one-line click error (`fail`) instead of a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EDM2Error as e:
            fail(e)
    return wrapper


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


class Float(click.ParamType):
    """A finite float, optionally bounded: Float(0, lo_open=True) is a positive number."""
    name = 'float'

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.bounds = (lo, hi, lo_open, hi_open)

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            try:
                number = float(str(value).strip())
            except ValueError:
                self.fail(f'expected a number, got {value!r}', param, ctx)
        error = check_range(number, *self.bounds)
        if error:
            self.fail(error, param, ctx)
        return number


def available_memory(device=None):
    """Bytes that new allocations can take now: the host's available memory (psutil), and for a CUDA
    `device` the smaller of that and the device's free memory."""
    import psutil
    free = psutil.virtual_memory().available
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


def check_memory(flag, count, item_bytes, item='item', device=None):
    """Refuse, before any work, a count whose items do not fit in the available memory: a one-line usage
    error naming `flag` (for sizes known only once an input is open, e.g. a network's resolution)."""
    error = memory_error(count, item_bytes, item, device)
    if error:
        raise click.BadParameter(error, param_hint=f"'{flag}'")


class Int(click.ParamType):
    """An integer, optionally bounded (inclusive); refuses '1.5' and values beyond the bounds.

    `item_bytes`: for a count or size flag, the memory one unit of it takes (a lower estimate): a number,
    or a function of the command's parameter values (a dict) when it depends on other flags. The value
    is refused when count x item_bytes exceeds the available memory: a number while the flag is parsed,
    a function once every flag is (commands built with `Command`, or the `command_class` of `Group`).
    `item` names the unit in the message."""
    name = 'integer'

    def __init__(self, lo=None, hi=None, item_bytes=None, item='item'):
        self.lo, self.hi, self.item_bytes, self.item = lo, hi, item_bytes, item

    def convert(self, value, param, ctx):
        try:
            number = int(value) if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            self.fail(f'expected an integer, got {value!r}', param, ctx)
        if (self.lo is not None and number < self.lo) or (self.hi is not None and number > self.hi):
            self.fail(f'must lie in [{"-inf" if self.lo is None else self.lo}, '
                      f'{"inf" if self.hi is None else self.hi}], got {number}', param, ctx)
        if self.item_bytes is not None and not callable(self.item_bytes):
            error = memory_error(number, self.item_bytes, self.item)
            if error:
                self.fail(error, param, ctx)
        return number


class Command(click.Command):
    """A click command that, once every flag is parsed and before the command runs, checks the `Int` flags
    whose memory per unit depends on other flags (`item_bytes` a function of the parameter values). When
    several flags share the blame (e.g. width, layers and batch of one network), the flag named is one given
    on the command line rather than left at its default, and among those the one furthest above its default."""

    def invoke(self, ctx):
        failed = []
        for param in self.params:
            kind, value = param.type, ctx.params.get(param.name)
            if isinstance(kind, Int) and callable(kind.item_bytes) and value is not None:
                error = memory_error(value, kind.item_bytes(ctx.params), kind.item, linear=False)
                if error:
                    given = ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE
                    default = param.get_default(ctx)
                    growth = value / default if isinstance(default, int) and default > 0 else 1
                    failed.append((not given, -growth, len(failed), param, error))
        if failed:
            *_, param, error = min(failed)
            raise click.BadParameter(error, ctx, param)
        return super().invoke(ctx)


class Group(click.Group):
    """A click group whose subcommands are `Command`s."""
    command_class = Command


def parse_number_list(text, hint, lo=None, hi=None, lo_open=False, hi_open=False):
    """'0.05,0.1' -> [0.05, 0.1]; '0.010,0.015,...,0.250' -> the evenly spaced range 0.010, ..., 0.250
    (step = difference of the two values before '...', which must land exactly on the value after).
    Every value must be finite and within the bounds; an empty list is refused. Errors are
    `click.BadParameter` naming `hint` (the flag)."""
    items = [s.strip() for s in str(text).split(',') if s.strip()]
    values = []
    i = 0
    try:
        while i < len(items):
            if items[i] in ('...', '…'):
                if len(values) < 2 or i + 1 >= len(items):
                    raise click.BadParameter(f'"..." needs two values before it and one after, e.g. '
                                             f'0.010,0.015,...,0.250; got {text!r}', param_hint=hint)
                step, end = values[-1] - values[-2], Decimal(items[i + 1])
                count = (end - values[-1]) / step if step != 0 else Decimal(-1)
                if step <= 0 or count < 1 or count != count.to_integral_value() or count > 100_000:
                    raise click.BadParameter(f'range {values[-2]},{values[-1]},...,{end} does not step evenly '
                                             f'upwards onto {end}', param_hint=hint)
                values += [values[-1] + step * (k + 1) for k in range(int(count))]
                i += 2
            else:
                values.append(Decimal(items[i]))
                i += 1
    except InvalidOperation:
        raise click.BadParameter(f'expected numbers separated by commas, got {text!r}', param_hint=hint) from None
    if not values:
        raise click.BadParameter('expected at least one value', param_hint=hint)
    result = [float(v) for v in values]
    for v in result:
        error = check_range(v, lo, hi, lo_open, hi_open)
        if error:
            raise click.BadParameter(error, param_hint=hint)
    return result


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


def check_file_name(name, flag, suffix=''):
    """Refuse a value that must be a plain file name (written inside an output folder) but is a path,
    hidden, empty, or too long once `suffix` is appended. Raises a one-line click error naming `flag`."""
    if (not name or name in ('.', '..') or '/' in name or '\\' in name or '\0' in name
            or name.startswith('.')):
        fail(f'expected a file name without slashes or a leading dot, got {name!r}', flag)
    if len(os.fsencode(name + suffix)) > NAME_MAX:
        fail(f'{name[:24]}...{suffix} would be {len(os.fsencode(name + suffix))} bytes long; a file name holds '
             f'at most {NAME_MAX}', flag)


def check_output(path, flag, folder=False):
    """Refuse, before any work, an output location that cannot be written: a name or path too long or a
    symbolic link to nothing (`path_problem`), `path` existing as the wrong kind (a file where a
    folder is wanted or the reverse), or it or its nearest existing parent folder not writable. Raises a
    one-line click error naming `flag`."""
    problem = path_problem(path)
    if problem:
        fail(problem, flag)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if folder != os.path.isdir(path):
            fail(f'{path} exists and is {"a folder" if os.path.isdir(path) else "not a folder"}; '
                 f'expected {"a folder" if folder else "a file"}', flag)
        if not os.access(path if folder else os.path.dirname(path), os.W_OK):
            fail(f'{path} is not writable', flag)
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f'cannot create {path}: {parent} is not a folder', flag)
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f'cannot create {path}: {parent} is not writable', flag)
