"""edm2.metrics.frechet: the eigenvalue route against scipy's sqrtm, rank-deficient statistics, the cached factor."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from edm2.metrics import frechet
from edm2.metrics.frechet import FrechetReference, frechet_distance


def _sqrtm_route(mu1, sigma1, mu2, sigma2):
    """The formula as usually written (Heusel et al. 2017): real part of scipy's sqrtm(Sigma1 Sigma2)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # singular products: scipy warns, the comparison is the point
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def _samples(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.randn(d, d) / np.sqrt(d)  # correlated features
    f = (rng.randn(n, d) * scale + shift) @ mix
    return f.mean(0), np.cov(f, rowvar=False)


def _published_style(rng, d):
    """A reference like the published Inception statistics (a power-law spectrum over four decades in a
    random basis, non-negative means) and a perturbed copy (a good model: FD small beside the traces)."""
    q, _ = np.linalg.qr(rng.randn(d, d))
    sigma = (q * (0.5 * np.arange(1, d + 1) ** -1.2)) @ q.T
    mu = np.abs(rng.randn(d)) * 0.3
    e = np.eye(d) + rng.randn(d, d) * 0.02 / np.sqrt(d)
    return (mu, sigma), (mu + rng.randn(d) * 0.01, e @ sigma @ e.T)


def _agrees_with_sqrtm(d, n):
    rng = np.random.RandomState(0)
    mu1, s1 = _samples(rng, n, d)
    mu2, s2 = _samples(rng, n, d, shift=0.05, scale=1.1)
    (mr, sr), (mp, sp) = _published_style(rng, d)
    for a in ((mu1, s1, mu2, s2), (mp, sp, mr, sr)):
        new, old = FrechetReference(*a[2:]).distance(*a[:2]), _sqrtm_route(*a)
        assert new == pytest.approx(old, rel=1e-6)  # both exact up to rounding: measured 1e-11 at 2048-d
        assert new > 0


def test_agrees_with_sqrtm_full_rank_small():
    _agrees_with_sqrtm(d=192, n=1000)


@pytest.mark.slow  # two 2048-d scipy sqrtm, ~10 s each on 2 idle cores
def test_agrees_with_sqrtm_full_rank_2048_from_10000_samples():
    _agrees_with_sqrtm(d=2048, n=10000)


def _rank_deficient(d, n):
    """Both covariances from n < d items: either side may be the factored one."""
    rng = np.random.RandomState(1)
    mu1, s1 = _samples(rng, n, d)
    mu2, s2 = _samples(rng, n, d, shift=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # rank deficiency is not a problem of this route: no warning
        a = FrechetReference(mu2, s2).distance(mu1, s1)
        b = FrechetReference(mu1, s1).distance(mu2, s2)
    # Neither side's null space (rounding noise) enters: both factors have the rank n - 1.
    assert FrechetReference(mu2, s2).rank == n - 1
    assert frechet._cholesky_factor(mu1, s1, 'sigma1')[0].shape == (n - 1, d)
    assert a == pytest.approx(b, rel=1e-8)
    old = _sqrtm_route(mu1, s1, mu2, s2)
    return a, abs(old - a) / a


def test_rank_deficient_either_side_small():
    fd, old_error = _rank_deficient(d=256, n=100)
    # The sqrtm route on the same statistics was off by 3.8e-8 relative (measured; its square root of a
    # singular, non-symmetric product carries rounding-level eigenvalues of either sign into the trace).
    assert old_error < 1e-6 and fd > 0


@pytest.mark.slow  # a 2048-d scipy sqrtm
def test_rank_deficient_either_side_2048_from_1000_samples():
    fd, old_error = _rank_deficient(d=2048, n=1000)
    # The sqrtm route was off by 4.1e-8 relative (measured): beyond the 1e-8 that both factorings meet.
    assert old_error < 1e-6 and fd > 0


def test_reference_factor_is_computed_once(monkeypatch):
    rng = np.random.RandomState(2)
    mu1, s1 = _samples(rng, 300, 64)
    mu2, s2 = _samples(rng, 300, 64, shift=0.1)
    built = []
    real_init = FrechetReference.__init__
    monkeypatch.setattr(FrechetReference, '__init__', lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    frechet._recent.clear()
    first = frechet_distance(mu1, s1, mu2, s2)
    # The same reference again (as a copy, as a reloaded file would be) against other statistics.
    second = frechet_distance(mu1 * 0.9, s1 * 1.1, mu2.copy(), s2.copy())
    assert len(built) == 1
    assert first == FrechetReference(mu2, s2).distance(mu1, s1)
    assert second == pytest.approx(_sqrtm_route(mu1 * 0.9, s1 * 1.1, mu2, s2), rel=1e-9)
    # A different reference is a new factor; the cache keeps a few, the oldest leaves first.
    before = len(built)
    for k in range(frechet.CACHED_REFERENCES):
        frechet_distance(mu1, s1, mu2 + (k + 1), s2)
    assert len(built) == before + frechet.CACHED_REFERENCES and len(frechet._recent) == frechet.CACHED_REFERENCES
    frechet_distance(mu1, s1, mu2, s2)  # pushed out by the last CACHED_REFERENCES others
    frechet_distance(mu1, s1, mu2 + frechet.CACHED_REFERENCES, s2)  # the most recent one stays
    assert len(built) == before + frechet.CACHED_REFERENCES + 1


def _refused(match, *args):
    frechet._recent.clear()
    with pytest.raises(frechet.FrechetError, match=match):
        frechet_distance(*args)


def test_matrices_that_are_not_covariances_are_refused_on_either_side():
    """Symmetry within the rounding level, positive semi-definiteness beyond it: refused in one line naming the
    side, never a silent choice of triangle or a negative distance."""
    rng = np.random.RandomState(5)
    mu, sigma = _samples(rng, 50, 6)
    mu2, sigma2 = _samples(rng, 50, 6, shift=0.1)
    z2 = np.zeros(2)
    cases = {  # name: (sigma, the part of the message)
        'triangular': (np.tril(sigma), 'not symmetric'),
        'non-symmetric': (sigma + 1e-3 * rng.randn(6, 6), 'not symmetric'),
        'indefinite': (np.array([[1.0, 2.0], [2.0, 1.0]]), 'not positive semi-definite'),
        'indefinite, zero diagonal': (np.array([[0.0, 1.0], [1.0, 0.0]]), 'not positive semi-definite'),
        'negative variance': (np.diag([1.0, -1.0]), 'not positive semi-definite'),
    }
    for name, (bad, message) in cases.items():
        m, good = (mu, sigma2) if bad.shape == sigma.shape else (z2, np.eye(2))
        _refused(f'sigma1 is {message}.*not a covariance matrix', m, bad, m + 0.1, good)   # the side not factored
        _refused(f'sigma2 is {message}.*not a covariance matrix', m + 0.1, good, m, bad)   # the reference
    # Asymmetry and negative eigenvalues within the rounding level are rounding: accepted, same value.
    _, level = frechet._rounding_level(mu, sigma)
    noise = np.triu(rng.uniform(-1, 1, (6, 6)), 1) * level / 2
    frechet._recent.clear()
    exact = frechet_distance(mu, sigma, mu2, sigma2)
    assert frechet_distance(mu, sigma + noise, mu2, sigma2 - noise) == pytest.approx(exact, rel=1e-9)
    singular = np.diag([1.0, 0.0]) - level * 1e-3 * np.eye(2) * [0, 1]  # eigenvalue -1e-3 level
    assert frechet_distance(z2, singular, z2, np.eye(2)) == pytest.approx(1 + 2 - 2, abs=1e-9)


def test_reference_files_with_a_broken_covariance_are_refused_naming_the_file(tmp_path):
    from edm2.metrics import inputs
    from edm2.metrics.reference import save_reference
    rng = np.random.RandomState(6)
    mu, sigma = _samples(rng, 50, 6)
    for name, bad in (('triangular', np.tril(sigma)), ('indefinite', sigma - 2 * np.eye(6) * sigma.max())):
        path = tmp_path / f'{name}.pkl'
        save_reference(path, {'fid': {'mu': mu, 'sigma': bad}})
        frechet._recent.clear()
        with pytest.raises(frechet.FrechetError) as e:
            inputs.load_checked_reference(str(path), ['fid'], 'dinov2')
        assert str(e.value).startswith(f'{path}: fid.sigma is not') and '\n' not in str(e.value), str(e.value)


def test_one_pass_statistics_with_large_means_are_not_warned_about():
    # Accumulated as E[x x^T] - mu mu^T (as FeatureStats does): rounding of eps * |mu|^2, far above eps * |Sigma|,
    # gives negative eigenvalues of that size, which are noise, not a broken covariance.
    rng = np.random.RandomState(3)
    stats = []
    for shift in (0.0, 0.002):
        f = 5 + shift + 0.01 * rng.randn(40, 128) @ rng.randn(128, 128) / np.sqrt(128)
        mu = f.mean(0)
        stats += [mu, (f.T @ f - len(f) * np.outer(mu, mu)) / (len(f) - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        a = FrechetReference(*stats[2:]).distance(*stats[:2])
        b = FrechetReference(*stats[:2]).distance(*stats[2:])
    assert a == pytest.approx(b, rel=1e-8) and a > 0  # measured 1.3e-10; rank n - 1 found on both sides
