"""Loading what a metrics run compares against, rank 0 first (a download happens once, the other ranks
then read the cache): the detectors, and the reference statistics checked against the metrics asked for.

Errors are `EDM2Error` subclasses with one-line messages naming the file.
"""

from edm2 import distributed
from edm2.errors import one_line

from . import adm, evaluate, frechet
from .adm_npz import AdmBatch, AdmFileError
from .detectors import load_detector
from .reference import load_reference


def load_detectors(names, device, inception_weights=None, dinov2_weights=None, resize_mode='torch') -> dict:
    """{name: Detector} for `names`; weights from the given paths, else the usual search (see detectors)."""
    weights = {'inception': inception_weights, 'dinov2': dinov2_weights}
    with distributed.rank0_first():
        return {name: load_detector(name, weights=weights[name], device=device, resize_mode=resize_mode)
                for name in names}


def load_checked_reference(path, metrics, pr_features) -> dict:
    """An EDM2 reference (.pkl, .npz or URL) that holds what `metrics` need."""
    with distributed.rank0_first():
        reference = load_reference(path)
    evaluate.check_reference(reference, metrics, pr_features, ref_name=f'reference {path}')
    check_covariances(reference, metrics, path)
    return reference


def check_covariances(reference, metrics, path):
    """Refuse, before any work, reference statistics of `metrics` whose sigma is not a covariance matrix
    (`edm2.metrics.frechet`), in one line naming the file and the key; decomposes each sigma once (the
    distances reuse the factor)."""
    for metric in metrics:
        stats = reference.get(metric)
        if isinstance(stats, dict) and 'sigma' in stats:
            frechet.reference(stats['mu'], stats['sigma'], names=(f'{path}: {metric}.mu', f'{path}: {metric}.sigma'))


def load_adm_reference(path, metrics, detectors, batch_size, device) -> dict:
    """The ADM reference of `metrics` from the batch file `path`: statistics from the file; the
    precision/recall features, and statistics the file lacks, computed from its arr_0 images on every rank."""
    dims = detectors['inception'].output_dims
    with distributed.rank0_first():
        batch = AdmBatch(path)
    ref, from_images = adm.read_reference(batch, metrics, {s: dims[o] for s, o in adm.STREAMS.items()})
    check_covariances(ref, metrics, path)
    need_pr = any(m in adm.PR_METRICS for m in metrics)
    if not from_images and not need_pr:
        return ref
    n = batch.num_images()
    distributed.print0(f'Computing features of the {n} reference images in {path}...')
    batches = adm.image_batches(batch, batch_size, device)
    try:  # (a truncated arr_0 is found while reading it)
        stats = evaluate.accumulate(batches, {'inception': detectors['inception']}, n, device=device,
                                    keep={adm.POOL} if need_pr else set(),
                                    extra=[s for s in from_images if s != adm.POOL])
        return adm.complete_reference(ref, stats, metrics)
    except AdmFileError:
        raise
    except ValueError as e:  # too few images for statistics
        raise evaluate.MetricError(f'{path}: {one_line(e)}') from None
