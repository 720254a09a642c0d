"""The results of a metrics command: which metrics and features a run needs, the values of one
evaluation, the printed table (each run, then min and mean over repeats) and the JSON record.

Errors are `EDM2Error` subclasses with one-line messages; the command line turns them into click errors.
"""

import time

import numpy as np

from edm2 import distributed
from edm2.errors import EDM2Error
from edm2.fileio import atomic_write_text
from edm2 import jsontext

from . import adm, evaluate

DEFAULT_METRICS = 'fid,fd_dinov2'
PROTOCOLS = ('edm2', 'adm')
_FORMATS = {'fid': '{:.4f}', 'fd_dinov2': '{:.4f}', 'precision': '{:.4f}', 'recall': '{:.4f}',
            'adm_fid': '{:.4f}', 'sfid': '{:.4f}', 'is': '{:.3f}', 'adm_precision': '{:.4f}', 'adm_recall': '{:.4f}'}


class OutputError(EDM2Error):
    """A result file (statistics, JSON, sample batch) could not be written."""


def cannot_write(path, error) -> OutputError:
    """The one-line OutputError for an OSError (or a bad value) met while writing `path`."""
    return OutputError(f'cannot write {path}: {getattr(error, "strerror", None) or error}')


def parse_metrics(text, protocol='edm2') -> list:
    """--metrics (None: the protocol's default) -> list. ADM metrics and EDM2 metrics need different
    references, so a run computes only one kind, and `protocol` 'adm' only the ADM kind (MetricError)."""
    if text is None:
        return list(adm.METRICS) if protocol == 'adm' else evaluate.parse_metrics(DEFAULT_METRICS)
    metrics = evaluate.parse_metrics(text)
    kinds = [m in adm.METRICS for m in metrics]
    if any(kinds) and not all(kinds):
        raise evaluate.MetricError(f'ADM metrics ({", ".join(adm.METRICS)}) and EDM2 metrics need different '
                                   f'references; compute them in separate runs')
    if protocol == 'adm' and not all(kinds):
        raise evaluate.MetricError(f'--protocol adm computes {", ".join(adm.METRICS)}')
    return metrics


def is_adm(metrics) -> bool:
    return any(m in adm.METRICS for m in metrics)


def kept_features(metrics, pr_features):
    """(feature sets whose rows are stored, extra Inception outputs) that `metrics` need."""
    if is_adm(metrics):
        return adm.kept_streams(metrics), adm.extra_streams(metrics)
    return ({pr_features} if any(m in evaluate.PR_METRICS for m in metrics) else set()), []


def evaluate_run(stats, reference, metrics, pr_features, adm_distances, seed, device) -> dict:
    """{metric: value} of one run's feature statistics against the reference."""
    return evaluate.compute_metrics(stats, reference, metrics, pr_detector=pr_features, seed=seed, device=device,
                                    pr_mode=adm_distances)


def _summarise(runs, metrics):
    if len(runs) < 2:
        return None
    return {m: {'min': float(min(r[m] for r in runs)), 'mean': float(np.mean([r[m] for r in runs]))}
            for m in metrics}


def print_table(rows, metrics, label):
    """rows: list of (name, {metric: value}); printed on rank 0."""
    head = f'{label:<24}' + ''.join(f'{m:>12}' for m in metrics)
    distributed.print0(head)
    distributed.print0('-' * len(head))
    for name, values in rows:
        distributed.print0(f'{name:<24}' + ''.join(f'{_FORMATS[m].format(values[m]):>12}' for m in metrics))


def report(runs, metrics, label, names):
    """Print every run (and min and mean over several); return the summary (None for one run)."""
    rows = list(zip(names, runs))
    summary = _summarise(runs, metrics)
    if summary:
        rows += [('min', {m: summary[m]['min'] for m in metrics}), ('mean', {m: summary[m]['mean'] for m in metrics})]
    print_table(rows, metrics, label)
    return summary


def detector_info(detectors) -> dict:
    """{name: {weights, sha256}} of the loaded detectors, for the JSON record."""
    return {name: {'weights': str(d.weights_path), 'sha256': d.weights_sha256} for name, d in detectors.items()}


def record(command, detectors, opts, **fields) -> dict:
    """The JSON record of a run: its own `fields`, then the settings every metrics command shares."""
    return dict(command=command, **fields, detectors=detector_info(detectors), dinov2_resize=opts['dinov2_resize'],
                pr_features=opts['pr_features'], protocol=opts['protocol'], adm_distances=opts['adm_distances'],
                world_size=distributed.get_world_size(), time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))


def write_json(path, obj):
    """Write `obj` as JSON to `path` atomically, on rank 0 (nothing when `path` is None)."""
    if path and distributed.is_main():
        try:
            atomic_write_text(path, jsontext.dumps(obj, f'{path}', indent=2) + '\n')
        except OSError as e:
            raise cannot_write(path, e) from None
        distributed.print0(f'Results written to {path}')
