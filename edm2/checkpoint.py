"""Network files: the native format (safetensors + a JSON header) written and read, published pickles
read, and networks built from either only after their stored shapes are checked.

Native format (`save_network`, one `.safetensors` file): the tensors of `net.state_dict()` plus, in the
safetensors header metadata under the key "edm2", a JSON document

    {"format": "edm2-network", "format_version": 1, "class": "Precond",
     "init_kwargs": {...}, "encoder": {"class": ...} | null, "gain_precision": null | "fp16" | "bf16",
     "kimg": int | null, "ema_std": float | null, "metadata": {...any other JSON metadata...}}

Reading it parses JSON and raw tensors only: nothing is unpickled. Every header field is type- and
range-checked, and the network the header describes is first built on the meta device (no memory) and
compared with the shapes the file stores, so a small file cannot make us allocate a large network.
Published pickles are read as data by `edm2.published` and pass the same check.

Snapshot files are named `{prefix}-{kimg:07d}-{sigma_rel:.3f}` plus `.pkl` (published) or
`NATIVE_SUFFIX`; `parse_snapshot_name` is the one parser of that rule.
"""

import collections
import contextlib
import inspect
import json
import math
import os
import pathlib
import re
import struct

import torch
from safetensors import safe_open

from edm2 import encoders, published
from edm2.download import DownloadError, fetch
from edm2.errors import EDM2Error, one_line
from edm2.fileio import save_safetensors
from edm2.network_config import NetworkConfigError, check_network_kwargs, state_shapes
from edm2.networks import Precond
from edm2.phema import SIGMA_REL_MAX

__all__ = ['CheckpointError', 'NativeFile', 'SnapshotName', 'load_network', 'load_snapshot', 'save_network',
           'read_header', 'parse_snapshot_name', 'snapshot_file_name', 'FORMAT', 'FORMAT_VERSION',
           'NATIVE_SUFFIX', 'PUBLISHED_SUFFIX']

NATIVE_SUFFIX = '.safetensors'
PUBLISHED_SUFFIX = '.pkl'
FORMAT = 'edm2-network'
FORMAT_VERSION = 1
_HEADER_KEY = 'edm2'
_NETWORK_CLASSES = {'Precond': Precond}
_GAIN_PRECISIONS = (None, 'fp16', 'bf16', 'fp32')


class CheckpointError(EDM2Error):
    """Any failure to find, download, read or write a network file; the message is one line naming it."""


def _error(path, message):
    return CheckpointError(f'{path}: {message}')


# ------------------------------------------------------------------------------------------------
# Snapshot names.

SnapshotName = collections.namedtuple('SnapshotName', 'prefix kimg std suffix')
_SNAPSHOT_NAME = re.compile(r'^(?P<prefix>.*)-(?P<kimg>\d+)-(?P<std>\d+\.\d+)'
                            rf'(?P<suffix>{re.escape(PUBLISHED_SUFFIX)}|{re.escape(NATIVE_SUFFIX)})$')


def parse_snapshot_name(name):
    """'network-snapshot-0002147-0.100.pkl' -> SnapshotName('network-snapshot', 2147, 0.1, '.pkl'); None
    for names that do not follow the rule (other suffixes included). Folders in `name` are ignored."""
    match = _SNAPSHOT_NAME.match(os.path.basename(str(name)))
    if match is None:
        return None
    return SnapshotName(match['prefix'], int(match['kimg']), float(match['std']), match['suffix'])


def snapshot_file_name(prefix, kimg, std, suffix=NATIVE_SUFFIX):
    """The inverse of parse_snapshot_name: '{prefix}-{kimg:07d}-{std:.3f}{suffix}'."""
    return f'{prefix}-{int(kimg):07d}-{float(std):.3f}{suffix}'


# ------------------------------------------------------------------------------------------------
# The native header.

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(doc, path):
    """Raise CheckpointError naming the first field of the "edm2" header document with a wrong type or value."""
    def field(name, ok, expected):
        if not ok:
            raise _error(path, f'header field {name!r} must be {expected}, got {doc.get(name)!r:.80}')

    if not isinstance(doc, dict) or doc.get('format') != FORMAT:
        raise _error(path, f'"{_HEADER_KEY}" header of an unknown format (expected "format": "{FORMAT}")')
    version = doc.get('format_version')
    field('format_version', _is_int(version) and 1 <= version <= FORMAT_VERSION,
          f'an integer from 1 to {FORMAT_VERSION} (a newer edm2 may read it)')
    field('class', isinstance(doc.get('class'), str) and doc['class'] in _NETWORK_CLASSES,
          f'one of {", ".join(_NETWORK_CLASSES)}')
    field('init_kwargs', isinstance(doc.get('init_kwargs'), dict), 'a dict of constructor arguments')
    field('encoder', doc.get('encoder') is None or isinstance(doc['encoder'], dict), 'null or a dict')
    precision = doc.get('gain_precision')
    field('gain_precision', precision is None or isinstance(precision, str) and precision in _GAIN_PRECISIONS,
          'null, "fp16", "bf16" or "fp32"')
    kimg = doc.get('kimg')
    field('kimg', kimg is None or _is_int(kimg) and kimg >= 0, 'null or a non-negative integer')
    std = doc.get('ema_std')
    field('ema_std', std is None or (isinstance(std, (int, float)) and not isinstance(std, bool)
                                     and math.isfinite(std) and 0 < std <= SIGMA_REL_MAX),
          f'null or a number in (0, {SIGMA_REL_MAX:.4f}]')
    field('metadata', doc.get('metadata') is None or isinstance(doc['metadata'], dict), 'null or a dict')
    nimg = (doc.get('metadata') or {}).get('nimg')
    if nimg is not None and not (_is_int(nimg) and nimg >= 0):
        raise _error(path, f'header field metadata.nimg must be a non-negative integer, got {nimg!r:.80}')
    return doc


class NativeFile:
    """An open native network file: `header` (the checked "edm2" document), `shapes` ({name: shape} of
    the stored tensors, read from the safetensors header without touching the data) and `tensor(name)`,
    which reads one tensor. Use as a context manager; errors are CheckpointError naming the file."""

    def __init__(self, path):
        self.path = path
        self._stack = contextlib.ExitStack()
        try:
            self._file = self._stack.enter_context(safe_open(str(path), framework='pt', device='cpu'))
            text = (self._file.metadata() or {}).get(_HEADER_KEY)
            if text is None:
                raise _error(path, f'safetensors file without {_HEADER_KEY} metadata (not a network checkpoint)')
            self.header = _check_header(json.loads(text), path)
            self.shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}
        except CheckpointError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 -- SafetensorError, JSONDecodeError, OSError, ...
            self.close()
            raise _error(path, f'unreadable native checkpoint ({one_line(e)})') from None

    def tensor(self, name):
        try:
            return self._file.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise _error(self.path, f'cannot read tensor {name} ({one_line(e)})') from None

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_header(path):
    """The checked "edm2" header document of a native file, without reading its tensors."""
    with NativeFile(path) as f:
        return f.header


# ------------------------------------------------------------------------------------------------
# Building a network from stored constructor arguments, checked against the stored shapes.

def _compare_shapes(expected, stored, path):
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = ([f'missing {len(missing)} tensors (e.g. {missing[0]})'] if missing else []) + \
                ([f'{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})'] if unexpected else [])
        raise _error(path, 'weights do not match the network: ' + ', '.join(parts))
    for name, shape in expected.items():
        if tuple(stored[name]) != tuple(shape):
            raise _error(path, f'{name} has shape {list(stored[name])}, the network expects {list(shape)}')


def _named_arguments(cls, args, kwargs, path):
    """The constructor arguments as one dict (published pickles record the leading ones positionally)."""
    names = [p.name for p in inspect.signature(cls).parameters.values()
             if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if not isinstance(args, (list, tuple)) or len(args) > len(names):
        raise _error(path, f'unexpected positional constructor arguments {args!r}')
    named = dict(zip(names, args))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise _error(path, f'constructor argument {twice[0]!r} given twice')
    return {**named, **kwargs}


def _build_network(class_name, args, kwargs, stored_shapes, path):
    """A network of class `class_name` whose parameters and buffers have exactly `stored_shapes`,
    allocated but not initialised (the caller copies the stored tensors in).

    The arguments are checked field by field, and the network they describe may not have more
    parameters than the file stores numbers, before anything is built (edm2.network_config works on
    the meta device); a small file can therefore never make us allocate a large network."""
    cls = _NETWORK_CLASSES.get(class_name)
    if cls is None:
        raise _error(path, f'unsupported network class {class_name!r} (expected one of {", ".join(_NETWORK_CLASSES)})')
    kwargs = _named_arguments(cls, args, kwargs, path)
    try:
        check_network_kwargs(kwargs, max_params=sum(math.prod(shape) for shape in stored_shapes.values()))
    except NetworkConfigError as e:
        raise _error(path, str(e)) from None
    _compare_shapes(state_shapes(kwargs), stored_shapes, path)
    with torch.device('meta'):
        net = cls(**kwargs)
    names = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
    if names != set(stored_shapes):  # a non-persistent buffer needs its constructor's value
        return cls(**kwargs)
    return net.to_empty(device='cpu')


def _copy_tensors(net, read):
    """Copy `read(name)` into every parameter and buffer of `net` (converted to the net's dtypes)."""
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            tensor.copy_(read(name).to(tensor.dtype))


# ------------------------------------------------------------------------------------------------
# Reading either kind, writing the native one.

def _read_native(path):
    with NativeFile(path) as f:
        doc = f.header
        net = _build_network(doc['class'], [], doc['init_kwargs'], f.shapes, path)
        _copy_tensors(net, f.tensor)
    net.gain_precision = doc['gain_precision']
    try:
        encoder = encoders.from_spec(doc['encoder'])
    except encoders.EncoderError as e:
        raise _error(path, f'header field \'encoder\': {one_line(e)}') from None
    metadata = dict(doc.get('metadata') or {})
    metadata.update(kimg=doc.get('kimg'), ema_std=doc.get('ema_std'))
    return net, encoder, metadata


def _read_published(path):
    try:
        snap = published.read(path)
    except published.PublishedSnapshotError as e:
        raise CheckpointError(str(e)) from None
    shapes = {name: tuple(t.shape) for name, t in snap.state_dict.items()}
    net = _build_network(snap.class_name, snap.init_args, snap.init_kwargs, shapes, path)
    _copy_tensors(net, snap.state_dict.__getitem__)
    # The release runs the network with its parameters as stored (float16 in published snapshots);
    # the only place where that precision reaches float32 inference is gain / sqrt(fan_in).
    gain = snap.state_dict.get('unet.out_gain')
    if gain is not None and gain.dtype in (torch.float16, torch.bfloat16):
        net.gain_precision = 'fp16' if gain.dtype == torch.float16 else 'bf16'
    return net, snap.encoder, snap.metadata


def _sniff(path):
    """'native' | 'pickle' | a description of what else the file is."""
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise _error(path, f'cannot read: {one_line(e)}') from None
    if len(head) >= 9 and head[8:9] == b'{':
        return 'native' if 8 + struct.unpack('<Q', head[:8])[0] <= size else 'truncated safetensors file'
    if head[:1] == b'\x80' and len(head) >= 2 and 2 <= head[1] <= 5:
        return 'pickle'
    if head[:4] == b'PK\x03\x04':
        return 'zip archive (torch.save?), not a network snapshot'
    return 'empty file' if not head else 'not a network checkpoint'


def load_snapshot(path_or_url, device=None):
    """(net, encoder, metadata) from a native file or a published pickle (local path or URL).

    The net is a Precond in eval mode with float32 weights on `device` (default CPU). metadata has
    at least `kimg` and `ema_std` (from the file, else parsed from a snapshot name, else None) and
    `format` ('native' or 'published'). Raises CheckpointError.
    """
    try:
        path = fetch(path_or_url)
    except DownloadError as e:
        raise CheckpointError(str(e)) from None
    kind = _sniff(path)
    if kind == 'native':
        net, encoder, metadata = _read_native(path)
    elif kind == 'pickle':
        net, encoder, metadata = _read_published(path)
    else:
        raise _error(path, kind)
    metadata['format'] = 'native' if kind == 'native' else 'published'
    name = parse_snapshot_name(str(path_or_url))
    if metadata.get('kimg') is None:
        metadata['kimg'] = name.kimg if name else None
    if metadata.get('ema_std') is None:
        metadata['ema_std'] = name.std if name else None
    net = net.eval().to(torch.float32)
    return net if device is None else net.to(device), encoder, metadata


def load_network(path_or_url, device=None):
    """The Precond of a native file or published pickle (eval mode, float32, on `device`); for a
    'diffusers:PATH_OR_ID[#SUBFOLDER]' spec, the text-to-image model's denoiser (`edm2.external`), called as
    net(x, sigma, net.encode_prompt(prompts))."""
    if isinstance(path_or_url, str) and path_or_url.strip().startswith('diffusers:'):
        from edm2.external.loading import load_denoiser  # imports diffusers: only for such a spec
        return load_denoiser(path_or_url, device=device)
    return load_snapshot(path_or_url, device=device)[0]


def save_network(path, net, encoder=None, *, dtype=None, **metadata):
    """Write `net` (a Precond) and its encoder in the native format, atomically, with umask permissions.

    Keyword metadata: `kimg` (training time in thousands of images) and `ema_std` (EMA length
    sigma_rel) are stored at the top level; everything else (JSON-serialisable) under "metadata".
    `dtype` (e.g. torch.float16) converts floating-point tensors for storage; default: as they are.
    """
    path = pathlib.Path(path)
    if not hasattr(net, 'init_kwargs'):
        raise _error(path, f'cannot save a {type(net).__name__}: it has no init_kwargs')
    kimg, ema_std = metadata.pop('kimg', None), metadata.pop('ema_std', None)
    tensors = {}
    for name, t in net.state_dict().items():
        t = t.detach().to('cpu')
        tensors[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    # Like the release, a network stored in reduced precision computes its gain scales in that
    # precision (see Precond.gain_precision); an explicit setting on the network wins.
    gain = tensors.get('unet.out_gain')
    stored = {torch.float16: 'fp16', torch.bfloat16: 'bf16'}.get(gain.dtype) if gain is not None else None
    doc = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'class': type(net).__name__,
           'init_kwargs': net.init_kwargs, 'encoder': encoder.spec() if encoder is not None else None,
           'gain_precision': getattr(net, 'gain_precision', None) or stored,
           'kimg': None if kimg is None else int(kimg), 'ema_std': None if ema_std is None else float(ema_std),
           'metadata': metadata}
    try:
        text = json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _error(path, f'metadata is not JSON-serialisable: {one_line(e)}') from None
    try:
        save_safetensors(path, tensors, metadata={_HEADER_KEY: text})
    except OSError as e:
        raise _error(path, f'cannot write: {one_line(e)}') from None
    return path


if __name__ == '__main__':  # `python -m edm2.checkpoint info|convert`, kept for existing scripts
    from edm2.commands.checkpoint_cli import cli
    cli(prog_name='python -m edm2.checkpoint')
