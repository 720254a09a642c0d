"""Reference results of the release's toy procedure (autoguidance paper, Figure 1), and the checks of what
holds on every one of its seeds, for comparison with our trained models.

The numbers are data, not code: the release's toy_example.py (NVlabs/edm2) trained with its published
settings and torch seeds 0, 1, 2 (all three models of a seed with that seed), evaluated with this project's
metrics (`edm2.toy.evaluate`) on 20,000 samples from sample seed 0. Source: the toy parity fixture's
README.json, key 'release-procedure-results' (tests/fixtures/toy/ of a source checkout); the copy below is
what the demo prints, and a test checks that it equals the fixture's. The release procedure's trained models
of seed 0 are package data (edm2/toy/data/release-models-seed0.pt, `release_models`).
"""

import json
import os

import torch

from edm2.toy.model import release_model
from edm2.toy.sampling import METHODS

# {seed: {method: (outliers %, leaf coverage %, branch TV)}}, copied from the fixture's README.json.
RELEASE_RESULTS = {
    0: {'unguided': (10.55, 42.2, 0.086), 'CFG': (12.42, 15.6, 0.689), 'autoguidance': (6.44, 31.2, 0.281),
        'naive truncation': (0.0, 0.0, 0.555)},
    1: {'unguided': (15.67, 12.5, 0.112), 'CFG': (26.66, 7.8, 0.701), 'autoguidance': (15.97, 26.6, 0.295),
        'naive truncation': (0.01, 0.0, 0.55)},
    2: {'unguided': (11.85, 28.1, 0.094), 'CFG': (23.01, 17.2, 0.63), 'autoguidance': (8.96, 21.9, 0.265),
        'naive truncation': (0.0, 0.0, 0.554)},
}
GROUND_TRUTH_RESULT = (1.08, 98.4, 0.023)  # the ground truth's own samples, same metrics
FIXTURE_KEYS = {'unguided': 'unguided', 'CFG': 'cfg_w4', 'autoguidance': 'autoguidance_w3',
                'naive truncation': 'truncation_w1.5'}
PROVENANCE = ("the release's toy_example.py (NVlabs/edm2), published settings, torch seeds 0-2, "
              "evaluated with this project's metrics on 20,000 samples (sample seed 0)")


def data_dir():
    """The package data of the toy example (edm2/toy/data, installed with the package): the release
    procedure's trained models of seed 0, which the demo draws as one row of its figure."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


def release_results(folder=None):
    """({seed: {method: (outliers %, leaf coverage %, branch TV)}}, where they were read from): the copy
    above, or the 'release-procedure-results' of FOLDER/README.json when a fixture folder is given and
    holds them."""
    if folder is None:
        return RELEASE_RESULTS, 'the copy in edm2/toy/reference.py'
    path = os.path.join(folder, 'README.json')
    try:
        with open(path) as f:
            data = json.load(f)['release-procedure-results']
        table = {int(k[4:]): {name: tuple(v[key]) for name, key in FIXTURE_KEYS.items()}
                 for k, v in data.items() if k.startswith('seed')}
        if table:
            return table, path
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return RELEASE_RESULTS, 'the copy in edm2/toy/reference.py'


def release_models(folder=None):
    """{'net', 'autoguide', 'cfg_guide'}: the release procedure's trained models of seed 0 from
    release-models-seed0.pt in `folder` (default: the package data, `data_dir()`), or None when it is absent.
    Its provenance is in tests/fixtures/README.md of a source checkout (the toy parity fixtures)."""
    path = os.path.join(folder or data_dir(), 'release-models-seed0.pt')
    if not os.path.isfile(path):
        return None
    models = torch.load(path, weights_only=True)['models']
    return dict(net=release_model(models['main']['state_dict']),
                autoguide=release_model(models['autoguide']['state_dict']),
                cfg_guide=release_model(models['cfg_guide']['state_dict']))


def as_row(result):
    """(outliers %, leaf coverage %, branch TV) of an `evaluate` result."""
    return (100 * result['outlier_rate'], 100 * result['leaf_coverage'], result['branch_tv'])


def summarise(per_seed):
    """{method: [(mean, min, max) per column]} over the seeds of {seed: {method: row}}."""
    out = {}
    for name in METHODS:
        rows = [r[name] for r in per_seed.values() if name in r]
        if rows:
            out[name] = [(sum(c) / len(c), min(c), max(c)) for c in zip(*rows)]
    return out


def seed_checks(per_seed):
    """What holds on every seed of the release's own procedure, checked on {seed: {method: row}}:
    [(description, holds)]. The mean of autoguidance's outlier rate relative to unguided's is below 1;
    CFG's branch TV is at least 1.8 x autoguidance's on every seed; naive truncation's leaf coverage is
    below 0.1 on every seed."""
    ratios = [r['autoguidance'][0] / max(r['unguided'][0], 1e-9) for r in per_seed.values()]
    tv = [r['CFG'][2] / max(r['autoguidance'][2], 1e-9) for r in per_seed.values()]
    leaves = [r['naive truncation'][1] / 100 for r in per_seed.values()]
    mean_ratio = sum(ratios) / len(ratios)

    def fmt(values, spec):
        return ', '.join(format(v, spec) for v in values)

    return [
        (f'mean autoguidance/unguided outlier ratio {mean_ratio:.2f} < 1 (per seed {fmt(ratios, ".2f")})',
         mean_ratio < 1),
        (f"CFG branch TV >= 1.8 x autoguidance's on every seed (ratios {fmt(tv, '.2f')})", min(tv) >= 1.8),
        (f'naive truncation leaf coverage < 0.1 on every seed ({fmt(leaves, ".3f")})', max(leaves) < 0.1),
    ]
