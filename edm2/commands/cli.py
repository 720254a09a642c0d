"""Shared pieces of the command lines: validated click parameter types, list parsing, one-line errors,
the run lock held for the length of a command, and the flags every command has (`--threads`, `--version`).

Every numeric flag is checked finite and inside its fixed meaningful range by click while it is parsed,
so that e.g. `--sigma_max inf` or `--lr nan` is refused with one line naming the flag. Memory is checked
where the allocation is known, never from the value alone at parse time: a count whose cost the flags fix
declares the memory one unit takes (`Int(item_bytes=...)`) and is checked once every flag is parsed
(`Command`); a count whose cost depends on an input (a batch larger than the images there are, a maximum
above a source's size) is checked by the command after the input is open, with the count that will really
be allocated (`check_memory`). Both compare with the memory available (`edm2.limits.available_memory`,
which honours a cgroup limit), so a value whose cost does not depend on it is never refused.
"""

import contextlib
import functools
import os
import sys
from decimal import Decimal, InvalidOperation

import click

from edm2 import __version__, threads
from edm2.errors import EDM2Error, one_line
from edm2.fileio import NAME_MAX
from edm2.limits import available_memory, check_range, format_bytes, memory_error, path_problem  # noqa: F401
from edm2.run_lock import FolderInUseError, hold_run_folder


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


def report_rank_error(error):
    """Print this torchrun process's one-line error at once, on a line of its own: before the process group is
    shut down (which may wait for, or be killed with, the other ranks, and the line would be lost) and after
    a newline, since rank 0's progress bar may be mid-line on the same console. The caller exits with 1."""
    rank = int(os.environ.get('RANK', 0))
    click.echo(f'{chr(10) if rank != 0 else ""}Error: {one_line(error)}', err=True)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()


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


def check_memory(flag, count, item_bytes, item='item', device=None):
    """Refuse, before any work, a count whose items do not fit in the available memory: a one-line usage
    error naming `flag` (for sizes known only once an input is open, e.g. a network's resolution, or a
    count capped by the input: pass the count that will be allocated)."""
    error = memory_error(count, item_bytes, item, device)
    if error:
        raise click.BadParameter(error, param_hint=f"'{flag}'")


class Int(click.ParamType):
    """An integer, optionally bounded (inclusive); refuses '1.5' and values beyond the bounds.

    `item_bytes`: for a count or size flag whose cost the flags alone fix, the memory one unit of it takes
    (a lower estimate): a number, or a function of the command's parameter values (a dict) when it depends
    on other flags. The value is refused when count x item_bytes exceeds the available memory, once every
    flag is parsed (commands built with `Command`, or the `command_class` of `Group`), not while this one
    is: no value is refused from the memory free at the moment it is read. `item` names the unit."""
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
        return number


class OneLineUsageError(click.UsageError):
    """A usage error (unknown flag, bad or missing value) shown as one line, `Error: ...` and where to find
    help, instead of click's three (usage, hint, error); exit status 2 as click's."""

    def __init__(self, error, ctx=None):
        super().__init__(error.format_message())
        self.exit_code = error.exit_code
        self.original = error  # the click error it stands for (NoSuchOption, BadParameter, ...)
        ctx = error.ctx if error.ctx is not None else ctx  # raised in a command's body: the command's context
        self.command_path = ctx.command_path if ctx is not None else None

    def show(self, file=None):
        hint = f" (see '{self.command_path} --help')" if self.command_path else ''
        click.echo(f'Error: {self.format_message().rstrip(".")}{hint}', file=file, err=file is None)


def _set_threads(ctx, param, value):
    if not ctx.resilient_parsing:
        threads.configure(value)
    return value


def threads_option():
    """`--threads N`: the CPU thread policy of edm2.threads, applied as soon as the flag is parsed."""
    return click.Option(['--threads'], type=Int(0), default=None, expose_value=False, callback=_set_threads,
                        metavar='N', help=f'CPU threads torch computes with [default: $EDM2_THREADS, else '
                        f'$OMP_NUM_THREADS, else {threads.DEFAULT_THREADS}: more threads stall on a busy machine; '
                        f'0 = one per core]')


def version_option():
    """`--version`: the edm2 version, then exit."""
    return click.Option(['--version'], is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
                        help='Print the edm2 version and exit.')


def _show_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f'{ctx.command_path} (edm2) {__version__}')
        ctx.exit()


class _OneLineUsage:
    """Mixin of `Command` and `Group`: usage errors become `OneLineUsageError`s."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except (OneLineUsageError, click.exceptions.NoArgsIsHelpError):  # the latter shows the help
            raise
        except click.UsageError as e:
            raise OneLineUsageError(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except click.UsageError as e:
            raise OneLineUsageError(e, ctx) from None


class _MemoryChecked(click.Command):
    """A click command that, once every flag is parsed and before the command runs, checks the memory of
    the `Int` flags that declare `item_bytes` (a number, or a function of the parameter values). When
    several flags share the blame (e.g. width, layers and batch of one network), the flag named is one given
    on the command line rather than left at its default, and among those the one furthest above its default."""

    def invoke(self, ctx):
        failed = []
        for param in self.params:
            kind, value = param.type, ctx.params.get(param.name)
            if isinstance(kind, Int) and kind.item_bytes is not None and value is not None:
                per_item = kind.item_bytes(ctx.params) if callable(kind.item_bytes) else kind.item_bytes
                error = memory_error(value, per_item, kind.item, linear=not callable(kind.item_bytes))
                if error:
                    given = ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE
                    default = param.get_default(ctx)
                    growth = value / default if isinstance(default, int) and default > 0 else 1
                    failed.append((not given, -growth, len(failed), param, error))
        if failed:
            *_, param, error = min(failed)
            raise click.BadParameter(error, ctx, param)
        return super().invoke(ctx)


class Command(_OneLineUsage, _MemoryChecked):
    """The project's click command: memory-checked count flags (`Int(item_bytes=...)`), usage errors in
    one line, and the common flags `--threads` and `--version`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [threads_option(), version_option()]


class Group(_OneLineUsage, click.Group):
    """A click group of `Command`s, with `--version` and usage errors in one line."""
    command_class = Command

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(version_option())


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


def hold_for_command(folder, flag='--outdir'):
    """Inside a click command: hold the lock of `folder` until the command ends (click closes it with
    its context, also on errors); a refusal is the command's one-line error, printed by rank 0 only.
    Returns the stale temporaries removed, as `hold_run_folder` yields them."""
    try:
        return click.get_current_context().with_resource(hold_run_folder(folder, flag))
    except FolderInUseError as e:
        fail_once(e)


def network_run_options(fn):
    """The click options --precision and --compile of a command that evaluates EDM2 networks; the command
    gets them as `precision` and `compile_unet` and passes both to `run_settings`."""
    fn = click.option('--compile', 'compile_unet', is_flag=True,
                      help='torch.compile the U-Net (the first call compiles; its time is reported once).')(fn)
    return click.option('--precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default=None,
                        help="Arithmetic of the U-Net on every device (CPU included).  [default: the network's "
                             "own: float16 on CUDA for published networks, float32 elsewhere]")(fn)


def run_settings(precision, compile_unet):
    """`edm2.runtime.RunSettings` of --precision and --compile, reporting the compile time on rank 0."""
    from edm2 import distributed, runtime

    def report(seconds):
        distributed.print0(f'torch.compile: the first U-Net call took {seconds:.1f} s (compilation included)')
    return runtime.RunSettings(precision=precision, compile=compile_unet, report=report)


def _set_vae(ctx, param, value):
    if value is not None and not ctx.resilient_parsing:
        from edm2.encoders import VAE_ENV
        if not os.path.isdir(os.path.expanduser(value)):
            raise click.BadParameter(f'{value} is not a folder (expected an AutoencoderKL folder, as '
                                     f'save_pretrained writes)', ctx, param)
        os.environ[VAE_ENV] = os.path.abspath(os.path.expanduser(value))
    return value


def vae_option(fn):
    """`--vae PATH`: a local AutoencoderKL folder used instead of the VAE a latent network's file names
    (edm2.encoders reads it from $EDM2_VAE), e.g. offline."""
    return click.option('--vae', metavar='PATH', default=None, expose_value=False, callback=_set_vae,
                        help='Local AutoencoderKL folder (save_pretrained) to decode/encode latents with, instead '
                             'of the Hugging Face model a latent network names (e.g. offline).')(fn)
