"""From a stream of images to metric values: which detectors a metric needs, feature accumulation over
ranks, reference files, and the metrics themselves.

Metrics of the EDM2 papers: 'fid' (Fréchet distance of Inception-v3 features; Heusel et al. 2017),
'fd_dinov2' (of DINOv2 ViT-L/14 features), 'precision' and 'recall' (Kynkäänniemi et al. 2019, k = 3, on
the features of `pr_detector`, DINOv2 by default; they need the reference's stored features, see
`ref --keep-features`). Metrics of the ADM evaluator ('adm_fid', 'sfid', 'is', 'adm_precision',
'adm_recall'): see `edm2.metrics.adm`; they are computed against an ADM reference batch (.npz).
"""

import numpy as np
import torch

from edm2.errors import EDM2Error

from . import adm
from .frechet import frechet_distance
from .precision_recall import precision_recall
from .stats import FeatureStats

FD_METRICS = {'fid': 'inception', 'fd_dinov2': 'dinov2'}
PR_METRICS = ('precision', 'recall')
ADM_METRICS = adm.METRICS
METRICS = tuple(FD_METRICS) + PR_METRICS + ADM_METRICS
PR_K = 3


class MetricError(EDM2Error):
    """Bad metric request or reference; one-line message."""


def parse_metrics(text) -> list:
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2'] (order kept, duplicates dropped); unknown names raise."""
    names = [s.strip() for s in str(text).split(',') if s.strip()]
    if not names:
        raise MetricError(f'no metric given; choose from: {", ".join(METRICS)}')
    for name in names:
        if name not in METRICS:
            raise MetricError(f'unknown metric {name!r}; choose from: {", ".join(METRICS)}')
    return list(dict.fromkeys(names))


def detectors_for(metrics, pr_detector='dinov2') -> list:
    """Detector names the metrics need, in a fixed order."""
    need = {FD_METRICS[m] for m in metrics if m in FD_METRICS}
    if any(m in ADM_METRICS for m in metrics):
        need.add('inception')
    if any(m in PR_METRICS for m in metrics):
        need.add(pr_detector)
    return [d for d in ('inception', 'dinov2') if d in need]


def check_reference(ref: dict, metrics, pr_detector='dinov2', ref_name='reference'):
    """Raise MetricError naming what `ref` lacks for the EDM2 `metrics` (ADM metrics: `adm.read_reference`)."""
    for m in metrics:
        if m in FD_METRICS and m not in ref:
            have = ', '.join(k for k in ref if k != 'features') or 'none'
            raise MetricError(f'{ref_name} has no {m} statistics (it has: {have})')
        if m in PR_METRICS and pr_detector not in ref.get('features', {}):
            raise MetricError(f'{ref_name} holds no {pr_detector} features, which {m} needs; '
                              f'make it with `calculate_metrics.py ref --keep-features`')


def accumulate(batches, detectors: dict, num_items: int, keep=(), device='cpu', keep_slots=None,
               extra=()) -> dict:
    """Run every detector over `batches` and return {feature set: FeatureStats}, reduced over ranks.

    batches: iterable of (uint8 images [B, C, H, W], positions [B] in 0..num_items-1) of this rank.
    Feature sets: each detector's name (its pool features), plus the Inception outputs named in `extra`
    ('inception_spatial', 'inception_logits'; see `edm2.metrics.adm`), all from one forward pass.
    keep: feature sets whose rows are stored (row = position, or keep_slots[position] when
    given, where -1 means "not stored" and the number of slots is max(keep_slots) + 1).
    """
    num_slots = num_items if keep_slots is None else int(np.max(keep_slots)) + 1
    streams = {name: (name, 'pool') for name in detectors}
    streams.update({name: ('inception', adm.STREAMS[name]) for name in extra})
    stats = {name: FeatureStats(detectors[det].output_dims[out], device=device, num_items=num_slots,
                                keep_features=name in keep) for name, (det, out) in streams.items()}
    slots_t = None if keep_slots is None else torch.as_tensor(np.asarray(keep_slots), dtype=torch.long)
    for images, positions in batches:
        positions = torch.as_tensor(positions, dtype=torch.long)
        slots = positions if slots_t is None else slots_t[positions]
        for det_name, det in detectors.items():
            wanted = {name: out for name, (d, out) in streams.items() if d == det_name}
            outputs = det.outputs(images, tuple(dict.fromkeys(wanted.values())))
            for name, out in wanted.items():
                stats[name].update(outputs[out], slots)
    for s in stats.values():
        s.reduce()
    return stats


def reference_from_stats(stats: dict, metrics=None) -> dict:
    """Reference-file dict {'fid': {mu, sigma}, 'fd_dinov2': ..., ['features': {...}]} from accumulated stats."""
    ref = {}
    for metric, det in FD_METRICS.items():
        if det in stats and (metrics is None or metric in metrics):
            mu, sigma = stats[det].mu_sigma()
            ref[metric] = {'mu': mu, 'sigma': sigma}
    features = {name: s.get_features() for name, s in stats.items() if s.features is not None}
    if features:
        ref['features'] = features
    return ref


def compute_metrics(stats: dict, ref: dict, metrics, pr_detector='dinov2', seed=0, device=None,
                    pr_mode='float16') -> dict:
    """{metric: value} of generated/evaluated `stats` against reference `ref` (an ADM reference dict for
    ADM metrics; `pr_mode` is their precision/recall distance precision, see `edm2.metrics.adm`)."""
    if any(m in ADM_METRICS for m in metrics):
        if not all(m in ADM_METRICS for m in metrics):
            raise MetricError('ADM metrics and EDM2 metrics need different references; compute them separately')
        return adm.compute_metrics(stats, ref, metrics, pr_mode=pr_mode, device=device)
    check_reference(ref, metrics, pr_detector)
    results = {}
    for m in metrics:
        if m in FD_METRICS:
            mu, sigma = stats[FD_METRICS[m]].mu_sigma()
            if ref[m]['mu'].shape != mu.shape:
                raise MetricError(f'reference {m} statistics are {ref[m]["mu"].shape[0]}-d but the detector gives '
                                  f'{mu.shape[0]}-d features (different detector weights?)')
            results[m] = frechet_distance(mu, sigma, ref[m]['mu'], ref[m]['sigma'])
    if any(m in PR_METRICS for m in metrics):
        real = ref['features'][pr_detector]
        gen = stats[pr_detector].get_features()
        if real.shape[1] != gen.shape[1]:
            raise MetricError(f'reference {pr_detector} features are {real.shape[1]}-d but the detector gives '
                              f'{gen.shape[1]}-d (different weights?)')
        # Kynkäänniemi et al. compare equal-sized sets: a seeded random subset of the larger one.
        n = min(len(real), len(gen))
        rnd = np.random.RandomState(seed % (1 << 31))
        if len(real) > n:
            real = real[np.sort(rnd.permutation(len(real))[:n])]
        if len(gen) > n:
            gen = gen[np.sort(rnd.permutation(len(gen))[:n])]
        p, r = precision_recall(real, gen, k=PR_K, device=device)
        results.update({'precision': p, 'recall': r})
        results = {m: results[m] for m in metrics}
    return results
