"""The toy example's ground truth: a 2D Gaussian mixture shaped as two fractal trees, with exact density
and score at every noise level (autoguidance paper, Figure 1 and Appendix C).

Heat diffusion to noise level sigma adds sigma^2 I to every covariance, so `logp` and `score` are exact
at every sigma. The tree's constants are facts of the autoguidance paper's release (see `edm2.toy`).
"""

import functools
import math

import numpy as np
import torch

from edm2.errors import EDM2Error

CLASSES = ('A', 'B', 'AB')
LOG_2PI = math.log(2 * math.pi)

# Tree geometry: origin and per-axis scale of both trees, the trunk angle of each class, seed of the
# numpy RandomState that draws every random number of both trees (class A first).
TREE_ORIGIN = (0.0030, 0.0325)
TREE_SCALE = (1.3136, 1.3844)
TREE_ANGLES = {'A': math.pi / 4, 'B': 5 * math.pi / 4}
TREE_DEPTHS = 7                     # branches at depths 0..6
TREE_SEED = 2
COMPONENTS_PER_BRANCH = 8
BRANCH_T = np.linspace(0.07, 0.93, COMPONENTS_PER_BRANCH)

# Branches whose best component lies this many nats below a point's best component are left out of its
# log-sum-exp: together they change it by less than 2032 * exp(-margin), far below the dtype's rounding.
PRUNE_MARGIN = {torch.float32: 32.0, torch.float64: 64.0}


class ToyError(EDM2Error):
    """Bad input to the toy example (unknown class, malformed points or noise levels, ...)."""


def check_classes(classes):
    if classes not in CLASSES:
        raise ToyError(f'unknown class {classes!r}; expected one of {", ".join(CLASSES)}')


def _build_tree(rnd, angle):
    """Branches of one tree, depth first (the + child and its subtree before the - child).

    Every branch consumes three standard normal numbers: its length's, then the + child's angle's, then
    the - child's angle's, each angle number drawn just before that child would be built. The deepest
    branches draw their children's numbers too, although those children are not built (as the release
    does; from the first leaf on, every later branch depends on it)."""
    branches = []  # (depth, start p, unit direction u, length L)

    def grow(p, a, d):
        length = 0.292 * 0.8 ** d * (1 + 0.2 * rnd.randn())
        u = np.array([math.cos(a), math.sin(a)])
        branches.append((d, p, u, length))
        for sign in (+1, -1):
            turn = 0.7 ** d * (1 + 0.2 * rnd.randn())
            if d + 1 < TREE_DEPTHS:
                grow(p + u * length, a + sign * turn, d + 1)

    grow(np.array(TREE_ORIGIN, dtype=np.float64), angle, 0)
    return branches


@functools.lru_cache(maxsize=None)
def _tree_branches():
    """{'A': [...], 'B': [...]} built from one RandomState, class A first."""
    rnd = np.random.RandomState(TREE_SEED)
    return {name: _build_tree(rnd, TREE_ANGLES[name]) for name in ('A', 'B')}


class GaussianMixture:
    """A 2D Gaussian mixture whose components come in 'branches' of J components that share weight and
    covariance and whose means lie on a line, mean_k = mid_b + tau_j v_b. That structure is what makes
    the exact score fast (see `_branch_terms`); the plain per-component arrays are exposed as well:

    weights [K] (sum 1), means [K, 2], covs [K, 2, 2] (float64 tensors), branch_of [K] (branch index),
    branch_depth [B], branch_weights [B], num_branches, leaf_branches (indices of the deepest branches).
    """

    def __init__(self, mids, dirs, covs, log_weights, tau, depths, name=''):
        self.name = name
        mids, dirs, covs = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mids, dirs, covs))
        log_weights = torch.as_tensor(np.asarray(log_weights), dtype=torch.float64)
        self.tau = torch.as_tensor(np.asarray(tau), dtype=torch.float64)
        J = len(self.tau)
        log_weights = log_weights - torch.logsumexp(log_weights + math.log(J), 0)  # normalise per component
        self._branch = dict(mid=mids, dir=dirs, cov=covs, logw=log_weights)
        self.num_branches = len(mids)
        self.branch_depth = torch.as_tensor(np.asarray(depths), dtype=torch.long)
        self.leaf_branches = torch.nonzero(self.branch_depth == self.branch_depth.max()).flatten()
        self.branch_of = torch.arange(self.num_branches).repeat_interleave(J)
        self.means = (mids[:, None, :] + self.tau[None, :, None] * dirs[:, None, :]).reshape(-1, 2)
        self.covs = covs.repeat_interleave(J, dim=0)
        self.weights = log_weights.exp().repeat_interleave(J)
        self.branch_weights = log_weights.exp() * J
        self._cache = {}

    def __len__(self):
        return len(self.weights)

    # ---- analytic moments and sampling -------------------------------------------------------
    def mean(self):
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self, sigma=0.0):
        d = self.means - self.mean()
        c = (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)
        return c + float(sigma) ** 2 * torch.eye(2, dtype=torch.float64)

    def sample(self, n, sigma=0.0, generator=None, device=None, dtype=torch.float32):
        """n points of the mixture diffused to sigma (scalar or [n] tensor), drawn with `generator`.

        Draw order (fixed, for reproducibility): component indices, then the component noise, then the
        diffusion noise; all on the CPU generator given (or the global one)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[comp]
        z = torch.randn(n, 2, 1, dtype=torch.float64, generator=generator)
        x = self.means[comp] + (chol @ z)[:, :, 0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        x = x + sigma * torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return x.to(device=device, dtype=dtype)

    # ---- exact density and score -------------------------------------------------------------
    def _params(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            b, tau = self._branch, self.tau
            params = dict(
                mx=b['mid'][:, 0], my=b['mid'][:, 1], vx=b['dir'][:, 0], vy=b['dir'][:, 1],
                a=b['cov'][:, 0, 0], b=b['cov'][:, 0, 1], c=b['cov'][:, 1, 1], logw=b['logw'] - LOG_2PI,
                # logit_j = c0 + tau_j beta - tau_j^2 gamma / 2  ->  [beta, gamma, c0] @ M
                M=torch.stack([tau, -0.5 * tau ** 2, torch.ones_like(tau)]),
                # responsibilities @ [1, tau_j] -> per-branch R = sum_j r_j, T = sum_j r_j tau_j
                N=torch.stack([torch.ones_like(tau), tau], dim=1),
            )
            self._cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in params.items()}
            self._cache[key]['tau_grid'] = (float(tau[0]), float(tau[1] - tau[0]), len(tau) - 1)  # evenly spaced
        return self._cache[key]

    def _branch_terms(self, x, s2, p):
        """Per-branch quantities of points x [n, 2] at variances s2 [n, 1] (sigma^2), each [n, B].

        Branch b, component j: mean m_b + tau_j v_b, covariance S_b + s2 I = [[A, b], [b, C]] with
        A = a + s2, C = c + s2; closed-form 2x2 inverse P = [[C, -b], [-b, A]] / det. With e = x - m_b:
        (x - mu_j)^T P (x - mu_j) = alpha - 2 tau_j beta + tau_j^2 gamma, alpha = e^T P e, beta = v^T P e,
        gamma = v^T P v, so logit_j = c0 + tau_j beta - tau_j^2 gamma / 2, a parabola in tau_j whose
        largest value on the grid is at the tau_j nearest its vertex beta / gamma: `best` [n, B] is the
        branch's largest logit, exactly. Returns (best, beta, gamma, c0, Pe_x, Pe_y, Pv_x, Pv_y).
        """
        A = p['a'] + s2
        C = p['c'] + s2
        det = A * C - p['b'] ** 2
        inv_det = det.reciprocal()
        ex = x[:, :1] - p['mx']
        ey = x[:, 1:] - p['my']
        pex = (C * ex - p['b'] * ey) * inv_det
        pey = (A * ey - p['b'] * ex) * inv_det
        pvx = (C * p['vx'] - p['b'] * p['vy']) * inv_det
        pvy = (A * p['vy'] - p['b'] * p['vx']) * inv_det
        beta = p['vx'] * pex + p['vy'] * pey
        gamma = p['vx'] * pvx + p['vy'] * pvy
        c0 = p['logw'] - 0.5 * (det.log() + ex * pex + ey * pey)
        tau0, step, last = p['tau_grid']
        t = ((beta / gamma - tau0) / step).round_().clamp_(0, last).mul_(step).add_(tau0)
        best = c0 + t * (beta - 0.5 * t * gamma)
        return best, beta, gamma, c0, pex, pey, pvx, pvy

    def _chunk(self, x, s2, p, want_score):
        """Exact log p [n] and score [n, 2] (or None) of a chunk of points.

        score = -sum_j r_j P (x - mu_j) = -sum_b P_b (R_b e_b - T_b v_b) (R, T: sums of the responsibilities
        r_j and r_j tau_j over the branch's components). Only the (point, branch) pairs within the pruning
        margin of the point's best component are expanded over the branch's J components."""
        best, beta, gamma, c0, pex, pey, pvx, pvy = self._branch_terms(x, s2, p)
        n, B = best.shape
        top = best.max(dim=1, keepdim=True).values
        pairs = (best >= top - PRUNE_MARGIN[x.dtype]).view(-1).nonzero().squeeze(1)
        q = torch.stack([beta, gamma, c0 - top]).view(3, n * B).index_select(1, pairs)
        w = (p['M'].T @ q).exp_()                      # [J, k] responsibilities, unnormalised
        RT = x.new_zeros(2, n * B).index_copy_(1, pairs, p['N'].T @ w).view(2, n, B)
        R, T = RT[0], RT[1]
        total = R.sum(1)
        logp = top[:, 0] + total.log()
        if not want_score:
            return logp, None
        score = torch.stack([(T * pvx - R * pex).sum(1), (T * pvy - R * pey).sum(1)], dim=1)
        return logp, score / total[:, None]

    def _prepare(self, x, sigma, dtype):
        if x.ndim != 2 or x.shape[1] != 2:
            raise ToyError(f'expected points of shape [n, 2], got {list(x.shape)}')
        dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if torch.any(sigma < 0) or not torch.all(torch.isfinite(sigma)):
            raise ToyError('sigma must be finite and non-negative')
        s2 = sigma.square().reshape(-1, 1).expand(len(x), 1)
        return x.detach().to(dtype), s2, self._params(x.device, dtype)

    def logp_and_score(self, x, sigma=0.0, dtype=None, want_score=True, chunk=512):
        """(log p(x; sigma) [n], grad_x log p(x; sigma) [n, 2]); sigma is a scalar or an [n] tensor.
        Computed in float32 unless x is float64 or dtype says otherwise."""
        xd, s2, p = self._prepare(x, sigma, dtype)
        outs = [self._chunk(xd[i:i + chunk], s2[i:i + chunk], p, want_score) for i in range(0, len(x), chunk)]
        logp = torch.cat([o[0] for o in outs]) if outs else xd.new_zeros(0)
        if not want_score:
            return logp, None
        return logp, torch.cat([o[1] for o in outs]) if outs else xd.new_zeros(0, 2)

    def logp(self, x, sigma=0.0, dtype=None):
        """log p(x; sigma) [n] (see `logp_and_score`)."""
        return self.logp_and_score(x, sigma, dtype, want_score=False)[0]

    def score(self, x, sigma=0.0, dtype=None):
        """grad_x log p(x; sigma) [n, 2] (see `logp_and_score`)."""
        return self.logp_and_score(x, sigma, dtype)[1]

    def nearest_branch(self, x, sigma=0.0, chunk=512):
        """Branch of the component with the largest posterior responsibility for each point (float64)."""
        xd, s2, p = self._prepare(x, sigma, torch.float64)
        outs = [self._branch_terms(xd[i:i + chunk], s2[i:i + chunk], p)[0].argmax(dim=1)
                for i in range(0, len(x), chunk)]
        return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long, device=x.device)

    def reference_logp_score(self, x, sigma=0.0):
        """Straightforward per-component evaluation in float64 (for tests)."""
        x = x.to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).square().reshape(-1, 1, 1, 1)
        cov = self.covs.to(x.device)[None] + s2 * torch.eye(2, dtype=torch.float64, device=x.device)
        prec = torch.linalg.inv(cov)
        d = x[:, None, :] - self.means.to(x.device)[None]                      # [n, K, 2]
        pd = torch.einsum('nkij,nkj->nki', prec.expand(len(x), -1, -1, -1), d)
        logits = self.weights.to(x.device).log() - 0.5 * (LOG_2PI * 2 + torch.logdet(cov) + (d * pd).sum(-1))
        logp = torch.logsumexp(logits, dim=1)
        r = torch.softmax(logits, dim=1)
        return logp, -(r[:, :, None] * pd).sum(1)


@functools.lru_cache(maxsize=None)
def gt(classes='A'):
    """The exact ground-truth mixture of class 'A', 'B' or their union 'AB' (weights normalised jointly).

    Branch at depth d from p with direction u and length L: thickness h = 0.2 0.8^d / L, size
    s = scale L 0.06 (per axis); 8 components at t = 0.07..0.93 with weight proportional to L 0.5^d, mean
    (p + u L t) scale and covariance (u u^T + (I - u u^T) h^2) * (s s^T) (elementwise product)."""
    check_classes(classes)
    scale = np.array(TREE_SCALE)
    mids, dirs, covs, logw, depths = [], [], [], [], []
    for name in classes:
        for d, p, u, L in _tree_branches()[name]:
            h = 0.2 * 0.8 ** d / L
            s = scale * L * 0.06
            uu = np.outer(u, u)
            covs.append((uu + (np.eye(2) - uu) * h ** 2) * np.outer(s, s))
            mids.append((p + u * L * 0.5) * scale)  # means (p + u L t) scale, t = 0.5 + tau
            dirs.append(u * L * scale)
            logw.append(math.log(L * 0.5 ** d))
            depths.append(d)
    return GaussianMixture(mids, dirs, covs, logw, BRANCH_T - 0.5, depths, name=classes)
