"""Restricted unpickling: read the published pickles (network snapshots, reference statistics) without
ever running code from them.

A pickle can name any importable function and call it while loading. `load` only resolves the
globals on an allow-list, each mapped to a harmless replacement written here; every other global is
refused with an error naming it. The plain allow-list rebuilds containers, numbers, strings and
numeric numpy arrays (enough for reference statistics). With `tensors=True` it also rebuilds torch
tensors, each of whose storages is a nested `torch.save` archive opened with
`torch.load(weights_only=True)`, and turns the release's persistent objects (classes pickled
together with their source code) into inert `PersistentRecord`s: their `module_src` is never looked
at, the caller rebuilds its own classes from the recorded constructor arguments and tensors.
"""

import collections
import io
import os
import pickle

import numpy as np
import torch

from edm2.errors import EDM2Error, one_line

__all__ = ['UnsafePickleError', 'PersistentRecord', 'load', 'load_tensor_archive']


class UnsafePickleError(EDM2Error):
    """The pickle names something outside the allow-list, or is malformed (message without the file name:
    callers prefix it). `refused` is the refused global's dotted name, if that was the reason."""

    def __init__(self, message, refused=None):
        super().__init__(message)
        self.refused = refused


class PersistentRecord:
    """A published persistent object: its class name and its pickled __dict__, nothing else."""

    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state


class _ModuleDictRecord(PersistentRecord):
    """Stand-in for torch.nn.ModuleDict: keeps the pickled __dict__ (its `_modules`). Pickles may create
    it without calling __init__, hence the class attributes."""
    class_name = 'ModuleDict'
    state = {}

    def __init__(self):
        super().__init__('ModuleDict', {})

    def __setstate__(self, state):
        self.state = state


class _EasyDict(dict):
    """Stand-in for the release's dict subclass with attribute access; a plain dict is enough."""


def _persistent_record(meta):
    # In place of the release's persistent-object reconstructor: meta['module_src'] is ignored.
    if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('class_name'), str):
        raise UnsafePickleError('malformed persistent object record')
    if not isinstance(meta.get('state'), dict):
        raise UnsafePickleError(f'persistent object {meta["class_name"]} without a state dict')
    return PersistentRecord(meta['class_name'], meta['state'])


def _torch_reason(error):
    """Why torch.load(weights_only=True) failed, in a few words of ours: never torch's advice to retry with
    weights_only=False (that would run code from the file)."""
    text = str(error)
    if 'WeightsUnpickler error:' in text:  # the detail sits on the first non-empty line after the marker
        detail = [line.strip() for line in text.split('WeightsUnpickler error:', 1)[1].splitlines() if line.strip()]
        detail = detail[0].split(' was not an allowed global')[0] if detail else ''
        return f'not a plain tensor file (written by torch.save, tensors only) or damaged: {detail}'.rstrip(': ')
    if 'weights_only' in text or isinstance(error, pickle.UnpicklingError):
        return 'not a plain tensor file (written by torch.save, tensors only) or damaged'
    first = one_line(text.split('\n', 1)[0]).split('. ')[0].rstrip('.')
    return first or type(error).__name__


def load_tensor_archive(source):
    """torch.load(source, weights_only=True) on the CPU: tensors and plain containers only, never code.
    Any failure is an `UnsafePickleError` whose message says why in our words (callers prefix the file)."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise UnsafePickleError('empty file (0 bytes), e.g. left by an interrupted copy or download')
    try:
        return torch.load(source, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for refused or corrupt archives
        raise UnsafePickleError(_torch_reason(e)) from None


def _storage_from_archive(data):
    # In place of torch.storage._load_from_bytes, which opens the archive with weights_only=False.
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError('tensor storage is not a byte string')
    try:
        storage = load_tensor_archive(io.BytesIO(data))
    except UnsafePickleError as e:
        raise UnsafePickleError(f'nested tensor archive: {e}') from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f'nested tensor archive holds {type(storage).__name__}, not a storage')
    return storage


def _tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError('tensor built from something that is not a storage')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                           bool(requires_grad), collections.OrderedDict())


def _parameter(data, requires_grad, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError('parameter built from something that is not a tensor')
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _text_to_bytes(obj, encoding='utf-8', errors='strict'):
    # How protocol-2 pickles spell bytes; only text codecs are allowed.
    if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise UnsafePickleError('_codecs.encode with a non-text argument')
    return obj.encode(encoding, errors)


def _numeric_dtype(dtype):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError('numpy data that is not plain numeric')
    return dtype


def _empty_array(subtype, shape, dtype):
    # Protocol < 5 arrays: an empty ndarray whose __setstate__ then receives the raw bytes.
    if subtype is not np.ndarray:
        raise UnsafePickleError('numpy array of a subclass')
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _array_from_buffer(buf, dtype, shape, order):
    return np.frombuffer(bytes(buf), dtype=_numeric_dtype(dtype)).reshape(shape, order=order).copy()


def _numpy_scalar(dtype, data=None):
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError('numpy scalar without raw bytes')
    return np.frombuffer(bytes(data), dtype=_numeric_dtype(dtype))[0]


def _plain_globals():
    allowed = {
        ('dnnlib.util', 'EasyDict'): _EasyDict,
        ('dnnlib', 'EasyDict'): _EasyDict,
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('_codecs', 'encode'): _text_to_bytes,
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
    }
    for package in ('numpy.core', 'numpy._core'):  # numpy 1.x and 2.x module names
        allowed[(f'{package}.multiarray', '_reconstruct')] = _empty_array
        allowed[(f'{package}.multiarray', 'scalar')] = _numpy_scalar
        allowed[(f'{package}.numeric', '_frombuffer')] = _array_from_buffer
    return allowed


_PLAIN = _plain_globals()
_TENSORS = {
    **_PLAIN,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_record,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictRecord,
    ('torch._utils', '_rebuild_tensor_v2'): _tensor,
    ('torch._utils', '_rebuild_parameter'): _parameter,
    ('torch.storage', '_load_from_bytes'): _storage_from_archive,
    ('torch', 'Size'): torch.Size,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed, tensors):
        super().__init__(file)
        self.allowed, self.tensors = allowed, tensors

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if self.tensors and module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f'refusing to load global {module}.{name} (not on the allow-list of '
                                f'published EDM2 files)', refused=f'{module}.{name}')

    def persistent_load(self, pid):
        raise UnsafePickleError('refusing a pickle with persistent ids (not a published EDM2 file)')


def load(source, tensors=False):
    """Unpickle `source` (bytes or a binary file) with the allow-list described above.

    Raises UnsafePickleError for refused globals, and for truncated or corrupt data (whatever the
    pickle machinery raised, as one line).
    """
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return _Unpickler(file, _TENSORS if tensors else _PLAIN, tensors).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated or corrupt pickles raise many different types
        raise UnsafePickleError(f'not a readable pickle ({one_line(e)})') from None
