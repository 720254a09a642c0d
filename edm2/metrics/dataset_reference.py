"""Writing the reference of a dataset from its accumulated feature statistics (the metrics command `ref`):
the EDM2 reference pickle (Fréchet statistics, Heusel et al. 2017, and optionally the features that
precision/recall need, Kynkäänniemi et al. 2019), or an ADM reference batch (guided-diffusion evaluator,
Dhariwal & Nichol 2021): a seeded subset of the images as arr_0 and the whole dataset's statistics.

Called on rank 0. Errors are one-line `EDM2Error`s: `OutputError` when the file cannot be written,
`DatasetError` naming the dataset when its statistics cannot be formed (e.g. too few images).
"""

import numpy as np

from edm2.data import DatasetError
from edm2.errors import one_line

from . import adm, evaluate
from .adm_npz import NpzImageWriter
from .reference import save_reference
from .report import cannot_write

_ROWS_PER_WRITE = 256


def save_edm2_reference(dest, stats, metrics, data):
    """Write the reference pickle of `metrics` (and any stored features) from the statistics of dataset `data`."""
    try:
        reference = evaluate.reference_from_stats(stats, metrics)
    except ValueError as e:
        raise DatasetError(f'{data}: {one_line(e)}') from None
    try:
        save_reference(dest, reference)
    except OSError as e:
        raise cannot_write(dest, e) from None


def save_adm_reference(dest, dataset, stats, num_images, seed, data) -> int:
    """Write an ADM reference batch: `num_images` images of `dataset` drawn with `seed` as arr_0, and
    mu, sigma (pool features) and mu_s, sigma_s (spatial features) of `stats`. Returns the image count."""
    chosen = adm.reference_subset(len(dataset), num_images, seed)
    try:
        (mu, sigma), (mu_s, sigma_s) = stats[adm.POOL].mu_sigma(), stats[adm.SPATIAL].mu_sigma()
        shape = (dataset.resolution, dataset.resolution, dataset.num_channels)
        with NpzImageWriter(dest, len(chosen), shape) as writer:
            for start in range(0, len(chosen), _ROWS_PER_WRITE):
                rows = chosen[start:start + _ROWS_PER_WRITE]
                writer.append(np.stack([dataset[int(i)][0].transpose(1, 2, 0) for i in rows]))
            writer.extra.update(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    except OSError as e:
        raise cannot_write(dest, e) from None
    except ValueError as e:
        raise DatasetError(f'{data}: {one_line(e)}') from None
    return len(chosen)
