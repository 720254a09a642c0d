"""The published EDM2 snapshot pickles, read as data: network class, constructor arguments, tensors,
encoder and metadata, without executing anything from the file.

A published snapshot (`network-snapshot-{kimg:07d}-{std:.3f}.pkl` of the official release) is a pickle
of a dict {ema, encoder, dataset_kwargs, loss_fn} whose objects are "persistent" classes stored
together with their source code. `edm2.safe_pickle` turns each into an inert record; this module
walks the records, collects the network's state dict and constructor arguments, and rebuilds the
encoder, which is small. Building the network itself (after its shapes are checked) is
`edm2.checkpoint`'s job, shared with the native format.
"""

import dataclasses

import numpy as np
import torch

from edm2 import encoders, safe_pickle
from edm2.errors import EDM2Error, one_line

__all__ = ['PublishedSnapshotError', 'PublishedSnapshot', 'read']


class PublishedSnapshotError(EDM2Error):
    """A published pickle cannot be read or holds something unexpected (one line naming the file)."""


@dataclasses.dataclass
class PublishedSnapshot:
    """What a published snapshot holds: the network as data, the encoder, and informational metadata."""
    class_name: str          # the network's class, e.g. 'Precond'
    init_args: list          # recorded positional constructor arguments (plain data)
    init_kwargs: dict        # recorded keyword constructor arguments (plain data)
    state_dict: dict         # name -> tensor, as stored (float16 in the release)
    encoder: object          # StandardRGBEncoder, StabilityVAEEncoder or None
    metadata: dict           # 'dataset_kwargs', 'loss_fn' when readable


def _error(path, message):
    return PublishedSnapshotError(f'{path}: {message}')


def plain(value, path, what):
    """`value` as JSON-ready plain data (numbers, strings, lists, dicts); anything else is refused."""
    if isinstance(value, dict):
        return {str(k): plain(v, path, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, path, what) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _error(path, f'{what} holds a {type(value).__name__}, expected plain data')


def collect_tensors(record, prefix, out, path):
    """Flatten the parameters and buffers of a module record tree into `out` (a state dict)."""
    if record is None:
        return
    if not isinstance(record, safe_pickle.PersistentRecord):
        raise _error(path, f'{prefix or "network"} is a {type(record).__name__}, not a module')
    for key in ('_parameters', '_buffers'):
        tensors = record.state.get(key, {})
        if not isinstance(tensors, dict):
            raise _error(path, f'{prefix}{key} is not a dict')
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise _error(path, f'{prefix}{name} is not a tensor')
            out[prefix + str(name)] = tensor.detach()
    modules = record.state.get('_modules', {})
    if not isinstance(modules, dict):
        raise _error(path, f'{prefix}_modules is not a dict')
    for name, child in modules.items():
        collect_tensors(child, f'{prefix}{name}.', out, path)


def _recorded_arguments(state, path, what):
    args, kwargs = state.get('_init_args', ()), state.get('_init_kwargs', {})
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise _error(path, f'{what} constructor arguments are not a list and a dict')
    return plain(list(args), path, what + ' arguments'), plain(dict(kwargs), path, what + ' arguments')


def _encoder(record, path):
    if record is None:
        return None
    if not isinstance(record, safe_pickle.PersistentRecord):
        raise _error(path, f'encoder is a {type(record).__name__}, expected a persistent object')
    if record.class_name == 'StandardRGBEncoder':
        return encoders.StandardRGBEncoder()
    if record.class_name != 'StabilityVAEEncoder':
        raise _error(path, f'unsupported encoder class {record.class_name!r}')
    kwargs = _recorded_arguments(record.state, path, 'encoder')[1]
    for key in ('vae_name', 'batch_size', 'scale', 'bias'):  # attributes set after construction win
        if key in record.state:
            kwargs[key] = plain(record.state[key], path, 'encoder ' + key)
    accepted = {'vae_name', 'raw_mean', 'raw_std', 'final_mean', 'final_std', 'batch_size', 'scale', 'bias'}
    try:
        return encoders.StabilityVAEEncoder(**{k: v for k, v in kwargs.items() if k in accepted})
    except Exception as e:  # noqa: BLE001 -- bad recorded values surface as many exception types
        raise _error(path, f'cannot build the StabilityVAEEncoder: {one_line(e)}') from None


def _informational_metadata(data, path):
    """dataset_kwargs and loss_fn settings, when they are plain data (left out otherwise)."""
    metadata = {}
    if isinstance(data.get('dataset_kwargs'), dict):
        try:
            metadata['dataset_kwargs'] = plain(data['dataset_kwargs'], path, 'dataset_kwargs')
        except PublishedSnapshotError:
            pass
    loss = data.get('loss_fn')
    if isinstance(loss, safe_pickle.PersistentRecord):
        settings = {k: v for k, v in loss.state.items() if not str(k).startswith('_')}
        try:
            metadata['loss_fn'] = {'class': loss.class_name, **plain(settings, path, 'loss_fn')}
        except PublishedSnapshotError:
            pass
    return metadata


def read(path) -> PublishedSnapshot:
    """Read a published snapshot pickle as data (see the module docstring). Raises PublishedSnapshotError."""
    try:
        with open(path, 'rb') as f:
            data = safe_pickle.load(f, tensors=True)
    except OSError as e:
        raise _error(path, f'cannot read: {one_line(e)}') from None
    except safe_pickle.UnsafePickleError as e:
        raise _error(path, str(e)) from None
    if not isinstance(data, dict):
        raise _error(path, f'expected a pickled dict with an "ema" network, found {type(data).__name__}')
    if 'ema' not in data:
        raise _error(path, f'no "ema" network in the snapshot (keys: {", ".join(map(str, data))})')
    ema = data['ema']
    if not isinstance(ema, safe_pickle.PersistentRecord) or ema.class_name == 'ModuleDict':
        raise _error(path, 'the snapshot has no network ("ema" is not a persistent module)')
    args, kwargs = _recorded_arguments(ema.state, path, 'network')
    state_dict = {}
    collect_tensors(ema, '', state_dict, path)
    return PublishedSnapshot(ema.class_name, args, kwargs, state_dict, _encoder(data.get('encoder'), path),
                             _informational_metadata(data, path))
