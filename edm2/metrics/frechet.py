"""Fréchet distance between two Gaussians (FID: Heusel et al., NeurIPS 2017; FD_DINOv2: Stein et al., NeurIPS 2023).

FD = ||mu1 - mu2||^2 + tr(Sigma1) + tr(Sigma2) - 2 tr((Sigma1 Sigma2)^(1/2)).

The trace term needs no square root of the non-symmetric product Sigma1 Sigma2. With the symmetric
S = Sigma2^(1/2), Sigma1 Sigma2 = (Sigma1 S) S and S (Sigma1 S) have the same non-zero eigenvalues, so

    tr((Sigma1 Sigma2)^(1/2)) = sum_i sqrt(lambda_i(S Sigma1 S)),

the eigenvalues of a symmetric positive semi-definite matrix (Dowson & Landau 1982). S comes from one
symmetric eigendecomposition of the reference, Sigma2 = V diag(w) V^T, kept as F = V_r diag(sqrt(w_r))
over the eigenvalues above rounding level (S = F V_r^T). The other side is factored per call as
Sigma1 = G G^T (Cholesky; pivoted, stopping at the numerical rank, when Sigma1 is singular, as it is for
fewer items than dimensions): S Sigma1 S = V_r K K^T V_r^T with K = F^T G, whose non-zero eigenvalues are
those of the smaller of K K^T and K^T K. Everything is float64 and exact up to rounding; neither side's
null space (rounding noise) enters, so rank-deficient statistics give the same value whichever side is
factored, and a few hundred items cost milliseconds.

Both covariances are checked before a distance is returned: a matrix that is not symmetric within the
rounding level, or that has a negative eigenvalue beyond it, is not a covariance matrix and is refused
with a one-line `FrechetError` naming it (never a silent choice of triangle, never a negative distance).
For the reference, the eigenvalues show it; for the other side, a pivoted Cholesky factorisation that
stops at rank r leaves a remainder sigma - G G^T whose entries are all within the rounding level exactly
when sigma is positive semi-definite up to rounding (a positive semi-definite remainder with diagonal
entries below the level has off-diagonal entries below it too). Negative eigenvalues within the level are
rounding and count as zero.

Side 2 is the reference: `FrechetReference` holds its factor, and `frechet_distance` reuses the factor
of statistics it has seen recently (looked up by content), so a sweep, `--repeats` and `calc` against
one reference decompose each reference covariance once.
"""

import collections
import hashlib

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from edm2.errors import EDM2Error


class FrechetError(EDM2Error):
    """The distance cannot be computed; one-line message."""


# Eigenvalues (and Cholesky pivots) within ROUNDING * dimension * float64 epsilon of the statistics'
# scale are rounding noise: dropped from the factors, and negative ones up to that size are set to zero
# silently. The scale is the largest second moment sigma_ii + mu_i^2, not the largest variance: a
# covariance accumulated as E[x x^T] - mu mu^T (`FeatureStats`) carries rounding of that size.
ROUNDING = 8
CACHED_REFERENCES = 4  # FID + FD_DINOv2, or adm_fid + sFID, with room to spare


def _rounding_level(mu, sigma):
    """(scale, level): the largest second moment and the rounding level below which values are noise."""
    scale = float(np.max(np.diag(sigma) + mu * mu)) if mu.size else 0.0
    return scale, ROUNDING * mu.shape[0] * np.finfo(np.float64).eps * max(scale, 0.0)


def _checked(mu, sigma, names):
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FrechetError(f'statistics do not match: {names[0]} {mu.shape} and {names[1]} {sigma.shape}')
    for name, a in zip(names, (mu, sigma)):
        if not np.all(np.isfinite(a)):
            raise FrechetError(f'{name} contains non-finite values')
    scale, level = _rounding_level(mu, sigma)
    asymmetry = float(np.max(np.abs(sigma - sigma.T))) if sigma.size else 0.0
    if asymmetry > level:
        _refuse(names[1], f'is not symmetric: entries differ from their transposed entries by up to '
                f'{asymmetry:.3g}', scale, level)
    return mu, sigma  # symmetric up to rounding: the factorisations read its lower triangle


def _refuse(name, what, scale, level):
    raise FrechetError(f'{name} {what} (scale {scale:.3g}, rounding level {level:.2g}): not a covariance matrix')


def _cholesky_factor(mu, sigma, name):
    """(G^T, triangular): sigma = G G^T up to rounding with G [d, r], r the numerical rank. When sigma is
    positive definite, G^T is the Cholesky factor U (upper triangular; only that triangle is valid) and
    `triangular` is True; otherwise G [d, rank] comes from the pivoted Cholesky factorisation."""
    d = sigma.shape[0]
    scale, level = _rounding_level(mu, sigma)
    # LAPACK works in place on a copy in Fortran order: the transpose of a C-ordered copy (the same matrix).
    u, info = lapack.dpotrf(np.array(sigma, order='C').T, lower=0, clean=0, overwrite_a=1)
    if info == 0 and np.min(np.diag(u)) ** 2 > level:
        return u, True  # sigma = U^T U
    if info < 0:
        raise FrechetError(f'{name}: Cholesky factorisation failed (LAPACK info {info})')
    u, piv, rank, info = lapack.dpstrf(np.array(sigma, order='C').T, lower=0, tol=level, overwrite_a=1)
    if info < 0:
        raise FrechetError(f'{name}: pivoted Cholesky factorisation failed (LAPACK info {info})')
    g = np.empty((d, rank))
    g[piv - 1] = np.triu(u[:rank]).T  # P^T sigma P = U^T U over the first `rank` rows of U
    # What the factor leaves out: within the rounding level everywhere when sigma is positive
    # semi-definite (see the module docstring); larger entries mean negative eigenvalues.
    remainder = float(np.max(np.abs(sigma - g @ g.T)))
    if remainder > 2 * level:
        _refuse(name, f'is not positive semi-definite: beyond its rank-{rank} Cholesky factor an entry of '
                f'{remainder:.3g} remains', scale, level)
    return g.T, False


def _eigh(sigma):
    """Eigenvalues and eigenvectors of a symmetric matrix (its lower triangle). A diagonal one (a stand-in
    reference) is its own decomposition: LAPACK's reduction of it runs into subnormal numbers and is slow."""
    off_diagonal = np.tril(sigma, -1)
    if not off_diagonal.any():
        return np.diag(sigma).copy(), np.eye(sigma.shape[0])
    return scipy.linalg.eigh(sigma, lower=True, driver='evr')


class FrechetReference:
    """Reference statistics (mu, Sigma) with the factor of Sigma^(1/2), decomposed once.

    distance(mu, sigma) -> the Fréchet distance between N(mu, sigma) and the reference.
    """

    def __init__(self, mu, sigma, names=('mu2', 'sigma2')):
        self.mu, sigma = _checked(mu, sigma, names)
        self.trace = float(np.trace(sigma))
        w, v = _eigh(sigma)
        scale, level = _rounding_level(self.mu, sigma)
        if w.size and w.min() < -level:
            _refuse(names[1], f'is not positive semi-definite: it has the eigenvalue {float(w.min()):.3g}', scale,
                    level)
        keep = w > level
        # F = V_r diag(sqrt(w_r)) (S = F V_r^T), in Fortran order for BLAS.
        self.factor = np.asfortranarray(v[:, keep] * np.sqrt(w[keep]))
        self._names = names

    @property
    def rank(self) -> int:
        return self.factor.shape[1]

    def trace_sqrt_product(self, mu, sigma, name='sigma1') -> float:
        """tr((sigma Sigma_ref)^(1/2)) for the statistics (mu, sigma): the sum of the singular values of F^T G
        (mu sets the rounding level only)."""
        gt, triangular = _cholesky_factor(mu, sigma, name)
        # K^T = G^T F [r1, r2]; its Gram matrices K^T K and K K^T share their non-zero eigenvalues.
        kt = blas.dtrmm(1.0, gt, self.factor) if triangular else gt @ self.factor
        gram = kt.T @ kt if kt.shape[1] <= kt.shape[0] else kt @ kt.T  # the smaller (numpy uses syrk for these)
        if gram.size == 0:
            return 0.0
        lam = scipy.linalg.eigh(gram, lower=True, eigvals_only=True, driver='ev', overwrite_a=True, check_finite=False)
        return float(np.sqrt(np.clip(lam, 0, None)).sum())  # a Gram matrix: negative values are rounding

    def distance(self, mu, sigma, names=('mu1', 'sigma1')) -> float:
        mu, sigma = _checked(mu, sigma, names)
        if mu.shape != self.mu.shape:
            raise FrechetError(f'statistics do not match: {names[0]} {mu.shape} vs {self._names[0]} '
                               f'{self.mu.shape}')
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * self.trace_sqrt_product(mu, sigma, names[1]))


_recent = collections.OrderedDict()  # content digest of (mu, sigma) -> FrechetReference, most recent last


def reference(mu, sigma, names=('mu2', 'sigma2')) -> FrechetReference:
    """The `FrechetReference` of (mu, sigma), reused while it is among the last CACHED_REFERENCES used
    (looked up by the arrays' contents, so a copy or a reloaded file finds it too). A `FrechetError` names
    the statistics by `names` (e.g. the file and key they were read from)."""
    mu, sigma = np.ascontiguousarray(mu, np.float64), np.ascontiguousarray(sigma, np.float64)
    digest = hashlib.sha1(usedforsecurity=False)
    for a in (mu, sigma):
        digest.update(repr(a.shape).encode())
        digest.update(a.data)
    key = digest.digest()
    if key in _recent:
        _recent.move_to_end(key)
        return _recent[key]
    ref = FrechetReference(mu, sigma, names)
    _recent[key] = ref
    while len(_recent) > CACHED_REFERENCES:
        _recent.popitem(last=False)
    return ref


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and the reference N(mu2, sigma2) (whose factor is reused)."""
    return reference(mu2, sigma2).distance(mu1, sigma1)
