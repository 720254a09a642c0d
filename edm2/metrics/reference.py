"""Reference statistics files (`--ref`) of the EDM2 protocol: the mean and covariance of detector features.

Format: a pickle of {'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}} (numpy float64), as published
at https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl, or an EDM1 `.npz` with `mu` / `sigma`
(FID only). Files written here use the same pickle layout, plus, with `ref --keep-features`, a
'features' entry {detector name: float32 [N, D]} for precision/recall.

ADM evaluator reference batches (`VIRTUAL_imagenet512.npz`: images and statistics) are read by
`edm2.metrics.adm_npz` for the ADM metrics; read here, only their `mu` / `sigma` are used (FID).

Pickles are read by `edm2.safe_pickle`'s plain allow-list, which can only build dicts, lists, numbers,
strings and numpy arrays: a reference file cannot run code. Every array is then checked to be real,
finite and of the expected shape, with errors naming the file and the key (e.g. `fid.sigma`).
"""

import pickle

import numpy as np

from edm2 import safe_pickle
from edm2.download import local_file
from edm2.errors import EDM2Error, numpy_reason
from edm2.fileio import atomic_write

METRIC_KEYS = ('fid', 'fd_dinov2')


class ReferenceFileError(EDM2Error):
    """A reference file cannot be used; one-line message naming the file (and the key at fault)."""


def _numeric_array(value, path, key, ndim, dtype):
    """`value` as a finite real array of `ndim` dimensions (at least one entry), else one line naming the key."""
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise ReferenceFileError(f'{path}: {key} is an object array; expected numbers')
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        raise ReferenceFileError(f'{path}: {key} is a ragged array; expected a {ndim}-D array of numbers') from None
    if array.dtype.kind not in 'iuf':
        raise ReferenceFileError(f'{path}: {key} holds {array.dtype} values; expected real numbers')
    if array.ndim != ndim or array.size == 0:
        raise ReferenceFileError(f'{path}: {key} has shape {list(array.shape)}; expected a non-empty {ndim}-D array')
    array = array.astype(dtype)
    if not np.all(np.isfinite(array)):
        raise ReferenceFileError(f'{path}: {key} holds non-finite values')
    return array


def _statistics(stats, path, metric):
    """{'mu': [D], 'sigma': [D, D]} checked."""
    mu = _numeric_array(stats['mu'], path, f'{metric}.mu', 1, np.float64)
    sigma = _numeric_array(stats['sigma'], path, f'{metric}.sigma', 2, np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ReferenceFileError(f'{path}: {metric} has mu {list(mu.shape)} and sigma {list(sigma.shape)}; '
                                 f'expected [D] and [D, D]')
    return {'mu': mu, 'sigma': sigma}


def load_reference(path_or_url) -> dict:
    """{'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}, ['features': {detector: array}]} from a .pkl or .npz."""
    path = local_file(path_or_url, ReferenceFileError, 'reference file')
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
        except Exception as e:  # noqa: BLE001 -- numpy raises many types for foreign or damaged archives
            raise ReferenceFileError(f'{path} is not an EDM1 statistics .npz with mu and sigma: '
                                     f'{numpy_reason(e)}') from None
    else:
        try:
            ref = safe_pickle.load(data)
        except safe_pickle.UnsafePickleError as e:
            reason = f'forbidden object {e.refused}' if e.refused else str(e)
            raise ReferenceFileError(f'{path} is not a reference statistics pickle: {reason}') from None
    if not isinstance(ref, dict):
        raise ReferenceFileError(f'{path} is not a reference statistics file (expected a dict)')
    out = {}
    for metric, stats in ref.items():
        if metric == 'features':
            if not isinstance(stats, dict):
                raise ReferenceFileError(f'{path}: "features" must map detector names to arrays')
            out['features'] = {str(k): _numeric_array(v, path, f'features.{k}', 2, np.float32)
                               for k, v in stats.items()}
            continue
        if not (isinstance(stats, dict) and 'mu' in stats and 'sigma' in stats):
            continue  # tolerate unrelated entries
        out[metric] = _statistics(stats, path, metric)
    if not any(k in out for k in METRIC_KEYS) and 'features' not in out:
        raise ReferenceFileError(f'{path} holds no statistics (expected keys {", ".join(METRIC_KEYS)})')
    return out


def save_reference(path, ref: dict):
    """Write `ref` as a reference pickle (plain dicts and numpy arrays), atomically."""
    with atomic_write(path) as f:
        pickle.dump(ref, f, protocol=4)
