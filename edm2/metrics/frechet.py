"""Fréchet distance between two Gaussians (FID: Heusel et al., NeurIPS 2017; FD_DINOv2: Stein et al., NeurIPS 2023).

FD = ||mu1 - mu2||^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^(1/2)), with scipy's matrix square root
and its real part. Sigma1 Sigma2 is not symmetric, and for nearly singular covariances (fewer items
than dimensions) its numerical square root can be non-finite or pick up an imaginary part: the first is
an error, the second a warning that states the magnitude.
"""

import warnings

import numpy as np
import scipy.linalg

from edm2.errors import EDM2Error


class FrechetError(EDM2Error):
    """The distance cannot be computed reliably; one-line message."""


# An imaginary part this large relative to the real part means the square root is not trustworthy.
IMAG_WARN_RATIO = 1e-3


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FrechetError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                           f'sigma {sigma1.shape} vs {sigma2.shape}')
    for name, a in (('mu1', mu1), ('mu2', mu2), ('sigma1', sigma1), ('sigma2', sigma2)):
        if not np.all(np.isfinite(a)):
            raise FrechetError(f'{name} contains non-finite values')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
        warnings.warn('Fréchet distance: sigma1 @ sigma2 is singular (fewer items than feature dimensions?); '
                      'the distance may be inaccurate', RuntimeWarning)
    if isinstance(covmean, tuple):  # older scipy with disp=False semantics
        covmean = covmean[0]
    if not np.all(np.isfinite(covmean)):
        raise FrechetError('matrix square root of sigma1 @ sigma2 is not finite (singular covariances; '
                           'use more images than feature dimensions)')
    if np.iscomplexobj(covmean):
        imag = float(np.abs(covmean.imag).max())
        real = float(np.abs(covmean.real).max())
        if imag > IMAG_WARN_RATIO * max(real, np.finfo(np.float64).tiny):
            warnings.warn(f'Fréchet distance: matrix square root has a significant imaginary part '
                          f'(max |imag| {imag:.3g} vs max |real| {real:.3g}); using the real part', RuntimeWarning)
        covmean = covmean.real
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return fd
