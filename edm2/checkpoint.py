"""Network checkpoints: our native format, safe import of published pickles, URL cache.

Native format (written by `save_network`, one `.safetensors` file): the tensors of
`net.state_dict()` plus, in the safetensors header metadata under the key "edm2", a JSON document

    {"format": "edm2-network", "format_version": 1, "class": "Precond",
     "init_kwargs": {...}, "encoder": {"class": ...} | null, "gain_precision": null | "fp16",
     "kimg": int | null,
     "ema_std": float | null, "metadata": {...any other JSON metadata...}}

Loading it reads JSON and raw tensors only: nothing is unpickled.

Published snapshots (`*.pkl`, SPEC section 6) are pickles of a dict {ema, encoder, dataset_kwargs,
loss_fn} whose objects are rebuilt by `torch_utils.persistence._reconstruct_persistent_obj(meta)`
with the defining module's source in `meta['module_src']`. `_SafeUnpickler` maps a small allow-list of
globals to harmless replacements, turns every persistent object into an inert record (module_src is
never looked at), opens each nested tensor-storage archive with `torch.load(weights_only=True)`, and
refuses every other global with an error naming it. Our own classes are then instantiated from the
recorded constructor kwargs and the tensors copied in.

Command line:
    python -m edm2.checkpoint info FILE_OR_URL
    python -m edm2.checkpoint convert IN OUT [--half]
"""

import collections
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import struct
import tempfile
import urllib.parse

import numpy as np
import torch

from edm2 import encoders as _encoders
from edm2.fileio import atomic_path
from edm2.networks import Precond

__all__ = ['CheckpointError', 'load_network', 'load_snapshot', 'save_network', 'fetch', 'read_published',
           'parse_snapshot_name', 'FORMAT', 'FORMAT_VERSION', 'NATIVE_SUFFIX']

NATIVE_SUFFIX = '.safetensors'
FORMAT = 'edm2-network'
FORMAT_VERSION = 1
_METADATA_KEY = 'edm2'
_NETWORK_CLASSES = {'Precond': Precond}


class CheckpointError(ValueError):
    """Any failure to find, download, read or write a checkpoint; the message is one line naming the file."""


def _err(path, msg):
    return CheckpointError(f'{path}: {msg}')


def _one_line(e):
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0]}' if text else type(e).__name__


# ------------------------------------------------------------------------------------------------
# Locating files: local paths and the URL cache.

def _cache_dir(cache_dir=None):
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get('EDM2_CACHE_DIR')
    return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'edm2'


def _is_url(s):
    return isinstance(s, str) and re.match(r'^https?://', s) is not None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def fetch(path_or_url, cache_dir=None, sha256_prefix=None):
    """Local path of a file or URL: local paths are checked to exist; http(s) URLs are downloaded once
    into `cache_dir` (default $EDM2_CACHE_DIR or ~/.cache/edm2) with a progress bar, written under a
    temporary name and renamed (safe with several processes), and reused afterwards. With
    `sha256_prefix` the file's SHA-256 hex digest must start with it.
    """
    s = str(path_or_url)
    if s.startswith('file://'):
        s = urllib.parse.unquote(urllib.parse.urlparse(s).path)
    if not _is_url(s):
        path = pathlib.Path(s).expanduser()
        if not path.is_file():
            raise _err(path, 'no such file')
        if sha256_prefix and not _sha256(path).startswith(sha256_prefix.lower()):
            raise _err(path, f'SHA-256 does not start with {sha256_prefix}')
        return path

    url = s
    base = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    base = re.sub(r'[^A-Za-z0-9._-]', '_', base)
    folder = _cache_dir(cache_dir) / 'downloads'
    target = folder / f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}'
    if target.is_file():
        if sha256_prefix and not _sha256(target).startswith(sha256_prefix.lower()):
            raise _err(url, f'cached file {target} does not match SHA-256 prefix {sha256_prefix}; delete it to retry')
        return target

    import requests
    from tqdm import tqdm
    from edm2 import distributed

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _err(url, f'cannot create cache folder {folder}: {_one_line(e)}') from None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{base}.', suffix='.tmp')
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, 'wb') as f:
            try:
                with requests.get(url, stream=True, timeout=60) as r:
                    if r.status_code != 200:
                        raise _err(url, f'download failed with HTTP status {r.status_code}')
                    total = int(r.headers.get('content-length', 0)) or None
                    with tqdm(total=total, unit='B', unit_scale=True, desc=f'Downloading {base}',
                              disable=not distributed.is_main(), leave=False) as bar:
                        for chunk in r.iter_content(chunk_size=1 << 20):
                            f.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                    if total is not None and f.tell() != total:
                        raise _err(url, f'download incomplete: {f.tell()} of {total} bytes')
            except requests.RequestException as e:
                raise _err(url, f'download failed: {_one_line(e)}') from None
        if sha256_prefix and not h.hexdigest().startswith(sha256_prefix.lower()):
            raise _err(url, f'downloaded file has SHA-256 {h.hexdigest()[:16]}..., expected prefix {sha256_prefix}')
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


_SNAPSHOT_NAME = re.compile(r'-(\d{7})-(\d+\.\d+)\.(?:pkl|safetensors)$')


def parse_snapshot_name(name):
    """(kimg, ema_std) from a name like `network-snapshot-0002147-0.100.pkl`, else (None, None)."""
    m = _SNAPSHOT_NAME.search(os.path.basename(str(name)))
    if not m:
        return None, None
    return int(m.group(1)), float(m.group(2))


# ------------------------------------------------------------------------------------------------
# The restricted unpickler for published pickles.

class _Refused(Exception):
    pass


class _PersistentRecord:
    """What a published persistent object becomes: its class name and its __dict__, nothing else."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state


class _ModuleDictRecord:
    """Stand-in for torch.nn.ModuleDict: keeps the pickled __dict__ (its `_modules`)."""

    def __setstate__(self, state):
        self.class_name = 'ModuleDict'
        self.state = state


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access); a plain dict is enough."""


def _reconstruct_persistent_obj(meta):
    # Replaces torch_utils.persistence._reconstruct_persistent_obj: meta['module_src'] is ignored.
    if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('class_name'), str):
        raise _Refused('malformed persistent object record')
    state = meta.get('state')
    if not isinstance(state, dict):
        raise _Refused(f'persistent object {meta["class_name"]} without a state dict')
    return _PersistentRecord(meta['class_name'], state)


def _load_from_bytes(b):
    # Replaces torch.storage._load_from_bytes, which would open the nested archive with weights_only=False.
    if not isinstance(b, (bytes, bytearray)):
        raise _Refused('tensor storage is not a byte string')
    try:
        storage = torch.load(io.BytesIO(b), weights_only=True, map_location='cpu')
    except Exception as e:  # noqa: BLE001
        raise _Refused(f'nested tensor archive refused by torch.load(weights_only=True): {_one_line(e)}') from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise _Refused(f'nested tensor archive holds {type(storage).__name__}, not a storage')
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise _Refused('tensor built from something that is not a storage')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                           bool(requires_grad), collections.OrderedDict())


def _rebuild_parameter(data, requires_grad, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused('parameter built from something that is not a tensor')
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _codecs_encode(obj, encoding='utf-8'):
    # How protocol-2 pickles spell bytes; only the text codecs are allowed.
    if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise _Refused('_codecs.encode with a non-text argument')
    return obj.encode(encoding)


def _numpy_globals():
    out = {}
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        out[(mod, '_reconstruct')] = _np_reconstruct
        out[(mod, 'scalar')] = _np_scalar
    for mod in ('numpy.core.numeric', 'numpy._core.numeric'):
        out[(mod, '_frombuffer')] = _np_frombuffer
    out[('numpy', 'ndarray')] = np.ndarray
    out[('numpy', 'dtype')] = np.dtype
    return out


def _np_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise _Refused('numpy array of a subclass')
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_frombuffer(buf, dtype, shape, order):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused('numpy array that is not plain numeric data')
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise _Refused('numpy scalar that is not plain numeric data')
    return np.frombuffer(bytes(data), dtype=dtype)[0]


_ALLOWED = {
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('dnnlib', 'EasyDict'): _EasyDict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictRecord,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('torch', 'Size'): torch.Size,
    ('_codecs', 'encode'): _codecs_encode,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    **_numpy_globals(),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f'refusing to load global {module}.{name} (not on the allow-list of published '
                       f'EDM2 snapshots)')

    def persistent_load(self, pid):
        raise _Refused('refusing a pickle with persistent ids (not a published EDM2 snapshot)')


def _collect_state_dict(record, prefix, out, path):
    """Flatten the parameters and buffers of a module record tree into a state dict."""
    if record is None:
        return
    if not isinstance(record, (_PersistentRecord, _ModuleDictRecord)):
        raise _err(path, f'{prefix or "network"} is a {type(record).__name__}, not a module')
    state = record.state
    for key in ('_parameters', '_buffers'):
        tensors = state.get(key, {})
        if not isinstance(tensors, dict):
            raise _err(path, f'{prefix}{key} is not a dict')
        for name, t in tensors.items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise _err(path, f'{prefix}{name} is not a tensor')
            out[prefix + name] = t.detach()
    modules = state.get('_modules', {})
    if not isinstance(modules, dict):
        raise _err(path, f'{prefix}_modules is not a dict')
    for name, sub in modules.items():
        _collect_state_dict(sub, f'{prefix}{name}.', out, path)


def _plain(value, path, what):
    """Check a recorded value is plain data (numbers, strings, lists, dicts) and return it JSON-ready."""
    if isinstance(value, dict):
        return {str(k): _plain(v, path, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, path, what) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _err(path, f'{what} holds a {type(value).__name__}, expected plain data')


def _network_from_record(record, path):
    if not isinstance(record, _PersistentRecord):
        raise _err(path, 'the snapshot has no network ("ema" is not a persistent module)')
    cls = _NETWORK_CLASSES.get(record.class_name)
    if cls is None:
        raise _err(path, f'unsupported network class {record.class_name!r} (expected one of {", ".join(_NETWORK_CLASSES)})')
    args = _plain(list(record.state.get('_init_args', ())), path, 'constructor arguments')
    kwargs = _plain(dict(record.state.get('_init_kwargs', {})), path, 'constructor arguments')
    try:
        net = cls(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _err(path, f'cannot build {record.class_name} from the recorded arguments: {_one_line(e)}') from None
    state_dict = {}
    _collect_state_dict(record, '', state_dict, path)
    _load_state_dict(net, state_dict, path)
    # The release runs the network with its parameters as stored (float16 in published snapshots);
    # the only place where that precision reaches float32 inference is gain / sqrt(fan_in).
    gain = state_dict.get('unet.out_gain')
    if gain is not None and gain.dtype in (torch.float16, torch.bfloat16):
        net.gain_precision = 'fp16' if gain.dtype == torch.float16 else 'bf16'
    return net


def _load_state_dict(net, state_dict, path):
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'missing {len(missing)} tensors (e.g. {missing[0]})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})')
        raise _err(path, 'weights do not match the network: ' + ', '.join(parts))
    with torch.no_grad():
        for name, t in own.items():
            src = state_dict[name]
            if tuple(src.shape) != tuple(t.shape):
                raise _err(path, f'{name} has shape {list(src.shape)}, the network expects {list(t.shape)}')
            t.copy_(src.to(t.dtype))


def _encoder_from_record(record, path):
    if record is None:
        return None
    if not isinstance(record, _PersistentRecord):
        raise _err(path, f'encoder is a {type(record).__name__}, expected a persistent object')
    state = record.state
    if record.class_name == 'StandardRGBEncoder':
        return _encoders.StandardRGBEncoder()
    if record.class_name == 'StabilityVAEEncoder':
        kwargs = _plain(dict(state.get('_init_kwargs', {})), path, 'encoder arguments')
        for key in ('vae_name', 'batch_size'):
            if key in state:
                kwargs[key] = _plain(state[key], path, 'encoder ' + key)
        for key in ('scale', 'bias'):
            if key in state:
                kwargs[key] = _plain(state[key], path, 'encoder ' + key)
        allowed = {'vae_name', 'raw_mean', 'raw_std', 'final_mean', 'final_std', 'batch_size', 'scale', 'bias'}
        try:
            return _encoders.StabilityVAEEncoder(**{k: v for k, v in kwargs.items() if k in allowed})
        except Exception as e:  # noqa: BLE001
            raise _err(path, f'cannot build the StabilityVAEEncoder: {_one_line(e)}') from None
    raise _err(path, f'unsupported encoder class {record.class_name!r}')


def _unpickle_published(path):
    try:
        with open(path, 'rb') as f:
            return _SafeUnpickler(f).load()
    except _Refused as e:
        raise _err(path, str(e)) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated or corrupt pickles raise many different types
        raise _err(path, f'not a readable published snapshot ({_one_line(e)})') from None


def read_published(path):
    """(net, encoder, metadata) from a published snapshot pickle, without executing anything from it."""
    data = _unpickle_published(path)
    if not isinstance(data, dict):
        raise _err(path, f'expected a pickled dict with an "ema" network, found {type(data).__name__}')
    if 'ema' not in data:
        raise _err(path, f'no "ema" network in the snapshot (keys: {", ".join(map(str, data))})')
    net = _network_from_record(data['ema'], path)
    encoder = _encoder_from_record(data.get('encoder'), path)
    metadata = {}
    if isinstance(data.get('dataset_kwargs'), dict):
        try:
            metadata['dataset_kwargs'] = _plain(data['dataset_kwargs'], path, 'dataset_kwargs')
        except CheckpointError:
            pass  # informational only
    loss = data.get('loss_fn')
    if isinstance(loss, _PersistentRecord):
        loss_state = {k: v for k, v in loss.state.items() if not k.startswith('_')}
        try:
            metadata['loss_fn'] = {'class': loss.class_name, **_plain(loss_state, path, 'loss_fn')}
        except CheckpointError:
            pass
    return net, encoder, metadata


# ------------------------------------------------------------------------------------------------
# Native format.

def _jsonable_metadata(metadata, path):
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise _err(path, f'metadata is not JSON-serialisable: {_one_line(e)}') from None


def save_network(path, net, encoder=None, *, dtype=None, **metadata):
    """Write `net` (a Precond) and its encoder in the native format, atomically.

    Keyword metadata: `kimg` (training time in thousands of images) and `ema_std` (EMA length
    sigma_rel) are stored at the top level; everything else (JSON-serialisable) under "metadata".
    `dtype` (e.g. torch.float16) converts floating-point tensors for storage; default: as they are.
    """
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    cls_name = type(net).__name__
    if not hasattr(net, 'init_kwargs'):
        raise _err(path, f'cannot save a {cls_name}: it has no init_kwargs')
    kimg = metadata.pop('kimg', None)
    ema_std = metadata.pop('ema_std', None)
    doc = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'class': cls_name,
        'init_kwargs': net.init_kwargs,
        'encoder': encoder.spec() if encoder is not None else None,
        'gain_precision': None,
        'kimg': None if kimg is None else int(kimg),
        'ema_std': None if ema_std is None else float(ema_std),
        'metadata': metadata,
    }
    tensors = {}
    for name, t in net.state_dict().items():
        t = t.detach().to('cpu')
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    # Like the release, a network stored in reduced precision computes its gain scales in that
    # precision (see Precond.gain_precision); an explicit setting on the network wins.
    gain = tensors.get('unet.out_gain')
    stored = {torch.float16: 'fp16', torch.bfloat16: 'bf16'}.get(gain.dtype) if gain is not None else None
    doc['gain_precision'] = getattr(net, 'gain_precision', None) or stored
    doc = _jsonable_metadata(doc, path)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(doc)})
    except OSError as e:
        raise _err(path, f'cannot write: {_one_line(e)}') from None
    return path


def _sniff(path):
    """'native' | 'pickle' | a description of what else it is."""
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
            f.seek(0, os.SEEK_END)
            size = f.tell()
    except OSError as e:
        raise _err(path, f'cannot read: {_one_line(e)}') from None
    if len(head) >= 9:
        n = struct.unpack('<Q', head[:8])[0]
        if head[8:9] == b'{' and 8 + n <= size:
            return 'native'
        if head[8:9] == b'{':
            return 'truncated safetensors file'
    if head[:1] == b'\x80' and len(head) >= 2 and 2 <= head[1] <= 5:
        return 'pickle'
    if head[:4] == b'PK\x03\x04':
        return 'zip archive (torch.save?), not a network snapshot'
    if not head:
        return 'empty file'
    return 'not a network checkpoint'


def _read_native(path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework='pt', device='cpu') as f:
            header = f.metadata() or {}
            if _METADATA_KEY not in header:
                raise _err(path, 'safetensors file without edm2 metadata (not a network checkpoint)')
            doc = json.loads(header[_METADATA_KEY])
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- SafetensorError, JSONDecodeError, ...
        raise _err(path, f'unreadable native checkpoint ({_one_line(e)})') from None
    if not isinstance(doc, dict) or doc.get('format') != FORMAT:
        raise _err(path, 'edm2 metadata of an unknown format')
    if not isinstance(doc.get('format_version'), int) or doc['format_version'] > FORMAT_VERSION:
        raise _err(path, f'format version {doc.get("format_version")} is newer than this edm2 reads ({FORMAT_VERSION})')
    cls = _NETWORK_CLASSES.get(doc.get('class'))
    if cls is None:
        raise _err(path, f'unsupported network class {doc.get("class")!r}')
    try:
        net = cls(**doc.get('init_kwargs', {}))
    except Exception as e:  # noqa: BLE001
        raise _err(path, f'cannot build {doc.get("class")} from the stored arguments: {_one_line(e)}') from None
    _load_state_dict(net, state_dict, path)
    try:
        net.gain_precision = doc.get('gain_precision')
    except ValueError as e:
        raise _err(path, str(e)) from None
    try:
        encoder = _encoders.from_spec(doc.get('encoder'))
    except _encoders.EncoderError as e:
        raise _err(path, str(e)) from None
    metadata = dict(doc.get('metadata') or {})
    metadata['kimg'] = doc.get('kimg')
    metadata['ema_std'] = doc.get('ema_std')
    return net, encoder, metadata


def load_snapshot(path_or_url, device=None):
    """(net, encoder, metadata) from a native file or a published pickle (local path or URL).

    The net is a Precond in eval mode with float32 weights on `device` (default CPU). metadata has
    at least `kimg` and `ema_std` (from the file, else parsed from a name like
    `...-{kimg:07d}-{std:.3f}.pkl`, else None) and `format` ('native' or 'published').
    """
    path = fetch(path_or_url)
    kind = _sniff(path)
    if kind == 'native':
        net, encoder, metadata = _read_native(path)
    elif kind == 'pickle':
        net, encoder, metadata = read_published(path)
    else:
        raise _err(path, kind)
    metadata['format'] = 'native' if kind == 'native' else 'published'
    kimg, std = parse_snapshot_name(path_or_url)
    if metadata.get('kimg') is None:
        metadata['kimg'] = kimg
    if metadata.get('ema_std') is None:
        metadata['ema_std'] = std
    net = net.eval().to(torch.float32)
    if device is not None:
        net = net.to(device)
    return net, encoder, metadata


def load_network(path_or_url, device=None):
    """The Precond of a native file or published pickle (eval mode, float32, on `device`)."""
    return load_snapshot(path_or_url, device=device)[0]


# ------------------------------------------------------------------------------------------------
# Command line: python -m edm2.checkpoint {info,convert}.

import click  # noqa: E402 -- the command line below; cheap to import


@click.group(help='Inspect and convert EDM2 network checkpoints (native .safetensors or published .pkl).')
def cli():
    pass


@cli.command(help='Print kind, configuration, parameter count, training time and EMA length.\n\n'
                  'Example: python -m edm2.checkpoint info network-snapshot-0002147-0.100.pkl')
@click.argument('file')
def info(file):
    try:
        net, encoder, meta = load_snapshot(file)
    except CheckpointError as e:
        raise click.ClickException(str(e))
    kimg = meta.get('kimg')
    std = meta.get('ema_std')
    kind = 'native (safetensors + JSON)' if meta['format'] == 'native' else 'published pickle (imported safely)'
    click.echo(f'file:        {file}')
    click.echo(f'kind:        {kind}')
    click.echo(f'class:       {type(net).__name__}')
    click.echo(f'config:      {json.dumps(net.init_kwargs)}')
    click.echo(f'parameters:  {sum(p.numel() for p in net.parameters()):,}')
    click.echo(f'training:    {"unknown" if kimg is None else f"{kimg} kimg"}')
    click.echo(f'EMA length:  {"unknown" if std is None else f"sigma_rel = {std:.3f}"}')
    click.echo(f'encoder:     {json.dumps(encoder.spec()) if encoder is not None else "none"}')
    extra = {k: v for k, v in meta.items() if k not in ('kimg', 'ema_std', 'format')}
    if extra:
        click.echo(f'metadata:    {json.dumps(extra)}')


@cli.command(help='Convert a published pickle or a native file to the native format (atomic write).\n\n'
                  'Example: python -m edm2.checkpoint convert edm2-img512-xs-2147483-0.135.pkl '
                  'edm2-img512-xs-2147483-0.135.safetensors')
@click.argument('src')
@click.argument('dst', type=click.Path(dir_okay=False))
@click.option('--half', is_flag=True,
              help='Store float16 weights (lossless for published snapshots, which are float16).')
def convert(src, dst, half):
    try:
        net, encoder, meta = load_snapshot(src)
        meta.pop('format', None)
        save_network(dst, net, encoder, dtype=torch.float16 if half else None, **meta)
    except CheckpointError as e:
        raise click.ClickException(str(e))
    click.echo(f'wrote {dst}')


if __name__ == '__main__':
    cli(prog_name='python -m edm2.checkpoint')
