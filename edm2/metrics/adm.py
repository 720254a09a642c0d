"""The ADM evaluator's protocol: FID, sFID, Inception Score, precision and recall against ADM reference batches.

NOTICE: this module follows the protocol of guided-diffusion's `evaluations/evaluator.py` (Dhariwal &
Nichol, "Diffusion models beat GANs on image synthesis", NeurIPS 2021; MIT licence, Copyright (c) 2021
OpenAI), which DiT, SiT, REPA, MAR and others report with. The code is written here; the numbers are
meant to match the evaluator's (its TensorFlow Inception graph is the FID graph our detector ports).

    adm_fid        Fréchet distance (Heusel et al., NeurIPS 2017) of the 2048-d pool features against the
                   reference batch's `mu` / `sigma`
    sfid           the same on 2023-d spatial features, channels 0-6 of Mixed_6d.branch1x1 flattened in
                   (H, W, C) order (Nash et al., "Generating images with sparse representations", ICML
                   2021), against `mu_s` / `sigma_s`
    is             Inception Score of the samples (Salimans et al., NeurIPS 2016), splits of 5 000
    adm_precision  improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of the pool features,
    adm_recall     k = 3, against the pool features of the reference batch's 10 000 images `arr_0`

A reference dict has the layout of `edm2.metrics.reference`: {'adm_fid': {'mu', 'sigma'}, 'sfid': {...},
'features': {'inception': [M, 2048]}}. When a batch file holds no statistics at all (a sample batch used
as reference), the evaluator computes them from its arr_0, and so does `missing_from_file` here.
"""

import numpy as np
import torch

from edm2 import distributed

from .adm_npz import IMAGES, STAT_KEYS, AdmBatch, AdmFileError
from .adm_precision_recall import adm_precision_recall
from .frechet import frechet_distance
from .inception_score import inception_score

METRICS = ('adm_fid', 'sfid', 'is', 'adm_precision', 'adm_recall')
PR_METRICS = ('adm_precision', 'adm_recall')
# Feature sets (names of FeatureStats in `edm2.metrics.evaluate.accumulate`) and the Inception outputs they hold.
POOL, SPATIAL, LOGITS = 'inception', 'inception_spatial', 'inception_logits'
STREAMS = {POOL: 'pool', SPATIAL: 'spatial', LOGITS: 'logits'}
_FD = {'adm_fid': (POOL, 'fid'), 'sfid': (SPATIAL, 'sfid')}  # metric -> (feature set, statistics in the file)


def extra_streams(metrics) -> list:
    """Inception outputs besides the pool features that `metrics` need, as feature-set names."""
    return [s for s, m in ((SPATIAL, 'sfid'), (LOGITS, 'is')) if m in metrics]


def kept_streams(metrics) -> set:
    """Feature sets whose rows must be stored (not only their mean and covariance)."""
    keep = {LOGITS} if 'is' in metrics else set()
    if any(m in PR_METRICS for m in metrics):
        keep.add(POOL)
    return keep


def read_reference(batch: AdmBatch, metrics, dims: dict):
    """(reference dict with what the file holds, streams to compute from its arr_0) for `metrics`.

    dims: {feature set: dimension} of the detector. Raises AdmFileError naming the file and the key that
    is missing or malformed.
    """
    ref, from_images = {}, []
    has_statistics = any(k in batch.keys for keys in STAT_KEYS.values() for k in keys)
    for metric, (stream, stat) in _FD.items():
        if metric not in metrics:
            continue
        if has_statistics:  # a reference batch: the statistics of the whole dataset must be there
            for key in STAT_KEYS[stat]:
                if key not in batch.keys:
                    raise batch.error(key, f'missing ({metric} needs {" and ".join(STAT_KEYS[stat])}; '
                                           f'the file has: {", ".join(batch.keys)})')
            mu, sigma = batch.statistics(stat, dims[stream])
            ref[metric] = {'mu': mu, 'sigma': sigma}
        else:
            from_images.append(stream)
    if from_images or any(m in PR_METRICS for m in metrics):
        n = batch.num_images()  # raises naming arr_0 when it is missing
        if n <= 3 and any(m in PR_METRICS for m in metrics):
            raise batch.error(IMAGES, f'holds {n} images; precision/recall need more than k = 3')
    return ref, from_images


def image_batches(batch: AdmBatch, batch_size: int, device='cpu'):
    """This rank's batches (uint8 NCHW tensor, positions) of the file's arr_0 (ranks take every
    world-th chunk of `batch_size` rows)."""
    n = batch.num_images()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    ranges = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)][rank::world]
    for (start, stop), rows in zip(ranges, batch.image_rows(ranges)):
        images = torch.from_numpy(rows.copy()).permute(0, 3, 1, 2)
        yield images.to(device), torch.arange(start, stop)


def complete_reference(ref: dict, stats: dict, metrics) -> dict:
    """Add to `ref` what was computed from the file's images: statistics and precision/recall features."""
    ref = dict(ref)
    for metric, (stream, _) in _FD.items():
        if metric in metrics and metric not in ref and stream in stats:
            mu, sigma = stats[stream].mu_sigma()
            ref[metric] = {'mu': mu, 'sigma': sigma}
    if any(m in PR_METRICS for m in metrics):
        ref['features'] = {POOL: stats[POOL].get_features()}
    return ref


def compute_metrics(stats: dict, ref: dict, metrics, pr_mode='float16', device=None) -> dict:
    """{metric: value} of the samples' `stats` (feature sets, see `extra_streams` / `kept_streams`)."""
    results = {}
    for metric, (stream, _) in _FD.items():
        if metric in metrics:
            mu, sigma = stats[stream].mu_sigma()
            results[metric] = frechet_distance(mu, sigma, ref[metric]['mu'], ref[metric]['sigma'])
    if 'is' in metrics:
        results['is'] = inception_score(stats[LOGITS].get_features())
    if any(m in PR_METRICS for m in metrics):
        p, r = adm_precision_recall(ref['features'][POOL], stats[POOL].get_features(), mode=pr_mode, device=device)
        results.update(adm_precision=p, adm_recall=r)
    return {m: results[m] for m in metrics}


def reference_subset(num_items: int, num: int, seed: int) -> np.ndarray:
    """Sorted positions of the `num` dataset items stored as arr_0 of an ADM reference (seeded, no repeats)."""
    if num_items <= num:
        return np.arange(num_items)
    return np.sort(np.random.RandomState(seed % (1 << 31)).permutation(num_items)[:num])


__all__ = ['METRICS', 'PR_METRICS', 'AdmBatch', 'AdmFileError', 'extra_streams', 'kept_streams', 'read_reference',
           'image_batches', 'complete_reference', 'compute_metrics', 'reference_subset']
