"""Fréchet distance between two Gaussians (FID: Heusel et al., NeurIPS 2017; FD_DINOv2: Stein et al., NeurIPS 2023).

FD = ||mu1 - mu2||^2 + tr(Sigma1) + tr(Sigma2) - 2 tr((Sigma1 Sigma2)^(1/2)).

The trace term needs no square root of the non-symmetric product Sigma1 Sigma2. With the symmetric
S = Sigma2^(1/2), Sigma1 Sigma2 = (Sigma1 S) S and S (Sigma1 S) have the same non-zero eigenvalues, so

    tr((Sigma1 Sigma2)^(1/2)) = sum_i sqrt(lambda_i(S Sigma1 S)),

the eigenvalues of a symmetric positive semi-definite matrix (Dowson & Landau 1982, the Fréchet distance
of two Gaussians). S comes from one symmetric eigendecomposition Sigma2 = V diag(w) V^T, kept as the
factor F = V_r diag(sqrt(w_r)) over the eigenvalues above rounding level (S Sigma1 S = V_r F^T Sigma1 F V_r^T,
so only the r x r matrix F^T Sigma1 F is decomposed). Everything is float64 and exact up to rounding,
also for rank-deficient statistics (fewer items than dimensions), where either side may be factored.
Negative eigenvalues from rounding are set to zero; larger ones (an input that is not a covariance
matrix) are too, with a warning stating their size.

Side 2 is the reference: `FrechetReference` holds its factor, and `frechet_distance` reuses the factor
of statistics it has seen recently (looked up by content), so a sweep, `--repeats` and `calc` against
one reference decompose each reference covariance once.
"""

import collections
import hashlib
import warnings

import numpy as np
import scipy.linalg

from edm2.errors import EDM2Error


class FrechetError(EDM2Error):
    """The distance cannot be computed; one-line message."""


# Eigenvalues within ROUNDING * dimension * float64 epsilon of the scale of the matrix are rounding
# noise (the backward error of a symmetric eigensolver grows with the dimension): positive ones of the
# reference covariance are dropped from its factor, negative ones are set to zero silently; below
# -that they are set to zero with a warning.
ROUNDING = 8
CACHED_REFERENCES = 4  # FID + FD_DINOv2, or adm_fid + sFID, with room to spare


def _rounding_level(dim, scale):
    return ROUNDING * dim * np.finfo(np.float64).eps * scale


def _checked(mu, sigma, names):
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FrechetError(f'statistics do not match: {names[0]} {mu.shape} and {names[1]} {sigma.shape}')
    for name, a in zip(names, (mu, sigma)):
        if not np.all(np.isfinite(a)):
            raise FrechetError(f'{name} contains non-finite values')
    return mu, (sigma + sigma.T) / 2  # the symmetric part (accumulated statistics are symmetric up to rounding)


def _warn_negative(eigenvalues, level, what):
    if eigenvalues.size and eigenvalues.min() < -level:
        warnings.warn(f'Fréchet distance: {what} has a negative eigenvalue {eigenvalues.min():.3g} (largest '
                      f'{eigenvalues.max():.3g}; rounding level {level:.2g}), not a covariance matrix; '
                      f'treated as zero', RuntimeWarning)


class FrechetReference:
    """Reference statistics (mu, Sigma) with the factor of Sigma^(1/2), decomposed once.

    distance(mu, sigma) -> the Fréchet distance between N(mu, sigma) and the reference.
    """

    def __init__(self, mu, sigma, names=('mu2', 'sigma2')):
        self.mu, sigma = _checked(mu, sigma, names)
        self.dim = self.mu.shape[0]
        self.trace = float(np.trace(sigma))
        w, v = scipy.linalg.eigh(sigma, driver='evr')
        level = _rounding_level(self.dim, np.abs(w).max())
        _warn_negative(w, level, names[1])
        keep = w > level
        self.scale = float(max(w.max(), 0.0))  # |F|^2
        self.rank = int(keep.sum())
        self.factor = v[:, keep] * np.sqrt(w[keep])  # F = V_r diag(sqrt(w_r)): S = F V_r^T
        self._names = names

    def trace_sqrt_product(self, sigma) -> float:
        """tr((sigma Sigma_ref)^(1/2)) = sum sqrt(lambda(F^T sigma F)) for a symmetric `sigma`."""
        if self.rank == 0:
            return 0.0
        m = self.factor.T @ sigma @ self.factor
        lam = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver='evr')
        # Rounding scale of F^T sigma F: |F|^2 |sigma| (spectral norm of F; Frobenius norm bounds sigma's).
        level = _rounding_level(self.dim, self.scale * float(np.linalg.norm(sigma)))
        _warn_negative(lam, level, f'{self._names[1]}^1/2 sigma1 {self._names[1]}^1/2 (sigma1 not positive '
                       f'semi-definite)')
        return float(np.sqrt(np.clip(lam, 0, None)).sum())

    def distance(self, mu, sigma, names=('mu1', 'sigma1')) -> float:
        mu, sigma = _checked(mu, sigma, names)
        if mu.shape != self.mu.shape:
            raise FrechetError(f'statistics do not match: {names[0]} {mu.shape} vs {self._names[0]} '
                               f'{self.mu.shape}')
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * self.trace_sqrt_product(sigma))


_recent = collections.OrderedDict()  # content digest of (mu, sigma) -> FrechetReference, most recent last


def reference(mu, sigma) -> FrechetReference:
    """The `FrechetReference` of (mu, sigma), reused while it is among the last CACHED_REFERENCES used
    (looked up by the arrays' contents, so a copy or a reloaded file finds it too)."""
    mu, sigma = np.ascontiguousarray(mu, np.float64), np.ascontiguousarray(sigma, np.float64)
    digest = hashlib.sha1(usedforsecurity=False)
    for a in (mu, sigma):
        digest.update(repr(a.shape).encode())
        digest.update(a.data)
    key = digest.digest()
    if key in _recent:
        _recent.move_to_end(key)
        return _recent[key]
    ref = FrechetReference(mu, sigma)
    _recent[key] = ref
    while len(_recent) > CACHED_REFERENCES:
        _recent.popitem(last=False)
    return ref


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and the reference N(mu2, sigma2) (whose factor is reused)."""
    return reference(mu2, sigma2).distance(mu1, sigma1)
