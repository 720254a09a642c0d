"""The run settings of the U-Net: the precision, memory layout and compilation it runs with in this process.

Precision is a property of the run, not of the device: `RunSettings(precision='bf16')` runs every U-Net
evaluation in bfloat16 on the CPU as on CUDA. Without one (`precision=None`) a network keeps the
published rule: `Precond.precision` (float16 from `use_fp16`) on CUDA, float32 on every other device.
The EDM preconditioning, σ, the loss and the log-uncertainty head stay float32 in every setting.

Commands set the settings for the work they do:

    >>> from edm2 import runtime
    >>> with runtime.running(runtime.RunSettings(precision='bf16', compile=True)):
    ...     images = sample(net, ...)          # every Precond call inside uses them

Channels-last layout (`channels_last=None`: the measured default of the device, `CHANNELS_LAST`) only
changes how activations are stored, never the arithmetic of a float32 result beyond rounding order.
Compilation wraps the U-Net's forward with torch.compile in place (`torch.nn.Module.compile`): the
module, its parameters and its state-dict keys stay what they were, so checkpoints are unchanged and a
run with compilation resumes one without it and vice versa.
"""

import contextlib
import contextvars
import dataclasses
import time

import torch

__all__ = ['PRECISIONS', 'CHANNELS_LAST', 'RunSettings', 'current', 'running', 'use_channels_last', 'compiled', 'call',
           'compile_seconds']

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}

# Device type -> whether activations are stored channels-last by default. Chosen by measurement
# (bench/device.py, docs/performance.md): on the CPU (oneDNN) convolutions of NHWC activations are
# faster in every precision; on CUDA, cuDNN's NHWC kernels are the fast ones for float16/bfloat16.
CHANNELS_LAST = {'cpu': True, 'cuda': True}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How every U-Net evaluation of this run is carried out.

        precision      'fp32' | 'bf16' | 'fp16' on any device; None: the network's published rule
        channels_last  store activations channels-last; None: CHANNELS_LAST of the device
        compile        torch.compile the U-Net (True: the default 'inductor' backend; a string names
                       another backend, e.g. 'aot_eager' in tests)
        report         called once, with the seconds the first compiled call took (compilation included)
    """
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | str = False
    report: object = None

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(PRECISIONS)} or None, got {self.precision!r}')


_DEFAULT = RunSettings()
_CURRENT = contextvars.ContextVar('edm2_run_settings', default=_DEFAULT)


def current() -> RunSettings:
    """The settings in force (the defaults outside `running`). Inside a graph that torch.compile traces (a
    `Precond` compiled as a whole by its user) they are the defaults: reading a context variable would break
    the graph, and a value read while tracing would be baked in unguarded. To compile with settings, name
    them: `RunSettings(compile=True)` compiles the U-Net under a `Precond` that reads them eagerly."""
    if torch.compiler.is_compiling():
        return _DEFAULT
    return _CURRENT.get()


@contextlib.contextmanager
def running(settings: RunSettings):
    """Use `settings` for every U-Net evaluation inside the block (this thread and its context only)."""
    token = _CURRENT.set(settings)
    try:
        yield settings
    finally:
        _CURRENT.reset(token)


def use_channels_last(device, settings=None) -> bool:
    """Whether activations on `device` are stored channels-last under `settings` (default: the current)."""
    settings = current() if settings is None else settings
    if settings.channels_last is not None:
        return settings.channels_last
    return CHANNELS_LAST.get(torch.device(device).type, False)


_first_call_seconds = []  # the compile time of this process, measured once


def compile_seconds():
    """Seconds the first compiled U-Net call of this process took (None before it happened)."""
    return _first_call_seconds[0] if _first_call_seconds else None


def compiled(module, settings=None):
    """`module` with its forward compiled in place (once: a compiled module stays compiled)."""
    settings = current() if settings is None else settings
    if getattr(module, '_edm2_compiled', None) is None:
        backend = settings.compile if isinstance(settings.compile, str) else 'inductor'
        module.compile(backend=backend)
        module._edm2_compiled = backend
    return module


def call(module, *args):
    """module(*args) under the current settings: compiled when they say so. The first compiled call of
    the process (where compilation happens) is timed and reported once through `RunSettings.report`."""
    settings = current()
    if not settings.compile:
        return module(*args)
    compiled(module, settings)
    if _first_call_seconds:
        return module(*args)
    start = time.perf_counter()
    output = module(*args)
    _first_call_seconds.append(time.perf_counter() - start)
    if settings.report is not None:
        settings.report(_first_call_seconds[0])
    return output
