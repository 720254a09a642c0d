"""Reference statistics files (`--ref`) of the EDM2 protocol.

Format: a pickle of {'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}} (numpy float64), as published
at https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl, or an EDM1 `.npz` with `mu` / `sigma`
(FID only). Files written here use the same pickle layout, plus, with `ref --keep-features`, a
'features' entry {detector name: float32 [N, D]} for precision/recall.

ADM evaluator reference batches (`VIRTUAL_imagenet512.npz`: images and statistics) are read by
`edm2.metrics.adm_npz` for the ADM metrics; read here, only their `mu` / `sigma` are used (FID).

Pickles are read by a restricted unpickler that can only build dicts, lists, numbers, strings and
numpy arrays: a reference file cannot run code.
"""

import importlib
import io
import os
import pickle

import numpy as np

from edm2.errors import EDM2Error
from edm2.fileio import atomic_write

METRIC_KEYS = ('fid', 'fd_dinov2')


class ReferenceFileError(EDM2Error):
    """A reference file cannot be used; one-line message naming the file."""


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict subclass) in pickles written by the official code."""


# The only globals a reference pickle may name: numpy's array/scalar rebuilders (under numpy 1.x and 2.x
# module names), the codec protocol-2 pickles use for raw bytes, and the official code's dict subclass.
_NUMPY_GLOBALS = {('multiarray', '_reconstruct'), ('multiarray', 'scalar'), ('numeric', '_frombuffer')}


def _codecs_encode(obj, encoding='utf-8', errors='strict'):
    if not isinstance(obj, str):
        raise pickle.UnpicklingError('unexpected _codecs.encode argument')
    return obj.encode(encoding, errors)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ('numpy', 'ndarray'):
            return np.ndarray
        if (module, name) == ('numpy', 'dtype'):
            return np.dtype
        if (module, name) == ('_codecs', 'encode'):
            return _codecs_encode
        if (module, name) == ('dnnlib.util', 'EasyDict'):
            return _EasyDict
        parts = module.split('.')
        if len(parts) == 3 and parts[:2] in (['numpy', 'core'], ['numpy', '_core']) \
                and (parts[2], name) in _NUMPY_GLOBALS:
            sub = importlib.import_module(f'numpy.{"_core" if hasattr(np, "_core") else "core"}.{parts[2]}')
            return getattr(sub, name)
        raise pickle.UnpicklingError(f'forbidden object {module}.{name}')


def _plain(obj):
    """Plain dicts all the way down; only numbers, strings and non-object numpy arrays allowed."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError('object arrays are not allowed')
        return obj
    if isinstance(obj, (int, float, str, bytes, bool, np.generic)) or obj is None:
        return obj
    raise pickle.UnpicklingError(f'unexpected {type(obj).__name__}')


def safe_load_pickle(data: bytes):
    return _plain(_SafeUnpickler(io.BytesIO(data)).load())


def _open_source(path_or_url):
    s = str(path_or_url)
    if '://' in s:
        from edm2.checkpoint import fetch  # cached download
        try:
            return str(fetch(s))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ReferenceFileError(f'cannot fetch reference {s}: {reason}') from None
    if not os.path.isfile(s):
        raise ReferenceFileError(f'reference file not found: {s}')
    return s


def load_reference(path_or_url) -> dict:
    """{'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}, ['features': {detector: array}]} from a .pkl or .npz."""
    path = _open_source(path_or_url)
    try:
        with open(path, 'rb') as f:
            data = f.read(4)
            if data != b'PK\x03\x04':  # .npz files (ZIPs) are read member by member, below
                data += f.read()
    except OSError as e:
        raise ReferenceFileError(f'cannot read reference {path}: {e.strerror}') from None
    if data[:4] == b'PK\x03\x04':  # .npz (a ZIP of .npy arrays): EDM1 FID statistics, or an ADM batch's
        try:  # (only mu and sigma are read: an ADM reference batch's 10 000 images stay on disk)
            with np.load(path, allow_pickle=False) as z:
                ref = {'fid': {'mu': z['mu'], 'sigma': z['sigma']}}
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ReferenceFileError(f'{path} is not an EDM1 statistics .npz with mu and sigma: {reason}') from None
    else:
        try:
            ref = safe_load_pickle(data)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ReferenceFileError(f'{path} is not a reference statistics pickle: {reason}') from None
    if not isinstance(ref, dict):
        raise ReferenceFileError(f'{path} is not a reference statistics file (expected a dict)')
    out = {}
    for metric, stats in ref.items():
        if metric == 'features':
            if not isinstance(stats, dict):
                raise ReferenceFileError(f'{path}: "features" must map detector names to arrays')
            out['features'] = {str(k): np.asarray(v, np.float32) for k, v in stats.items()}
            continue
        if not (isinstance(stats, dict) and 'mu' in stats and 'sigma' in stats):
            continue  # tolerate unrelated entries
        mu, sigma = np.asarray(stats['mu'], np.float64), np.asarray(stats['sigma'], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ReferenceFileError(f'{path}: {metric} has mu {mu.shape} and sigma {sigma.shape}; '
                                  f'expected [D] and [D, D]')
        out[metric] = {'mu': mu, 'sigma': sigma}
    if not any(k in out for k in METRIC_KEYS) and 'features' not in out:
        raise ReferenceFileError(f'{path} holds no statistics (expected keys {", ".join(METRIC_KEYS)})')
    return out


def save_reference(path, ref: dict):
    """Write `ref` as a reference pickle (plain dicts and numpy arrays), atomically."""
    with atomic_write(path) as f:
        pickle.dump(ref, f, protocol=4)
