"""The 2D toy example of the autoguidance paper (Figure 1, Appendix C; SPEC section 8).

* `gt(classes)`: the exact ground truth, a Gaussian mixture shaped as two fractal trees (class 'A',
  class 'B', or their union 'AB'), with exact density and score at every noise level sigma
  (heat diffusion to sigma adds sigma^2 I to each covariance).
* `ToyModel`: an MLP of magnitude-preserving layers that predicts log p(x; sigma); its score is the
  gradient by autodiff.
* `train()`: exact score matching against the ground truth with a power-function EMA.
* `heun_sample()`: the EDM Heun sampler driven by scores, with guidance by a second model
  (autoguidance or CFG) or naive truncation (the score scaled by w).
* `SmoothedGT` / `ideal_models()`: idealised models whose only error is a loss of resolution (the exact
  ground truth blurred), the kind of error autoguidance assumes.
* `evaluate()`: outlier rate, leaf-branch coverage and mean log-likelihood under the ground truth.
"""

import copy
import functools
import json
import math
import os

import numpy as np
import safetensors.torch
import torch

from edm2 import mp
from edm2.fileio import atomic_path
from edm2.phema import std_to_exp
from edm2.sampling import edm_schedule

CLASSES = ('A', 'B', 'AB')
SIGMA_DATA = 0.5
LOG_2PI = math.log(2 * math.pi)

# Tree geometry (SPEC section 8).
TREE_ORIGIN = (0.0030, 0.0325)
TREE_SCALE = (1.3136, 1.3844)
TREE_ANGLES = {'A': math.pi / 4, 'B': 5 * math.pi / 4}
TREE_DEPTHS = 7                     # branches at depths 0..6
TREE_SEED = 2
COMPONENTS_PER_BRANCH = 8
BRANCH_T = np.linspace(0.07, 0.93, COMPONENTS_PER_BRANCH)
# The SPEC does not name the distribution of the random numbers r; we draw them with
# RandomState.randn (standard normal), so each length/angle varies by a factor 1 + 0.2 r.


def _draw_r(rnd):
    return rnd.randn()


def _build_tree(rnd, angle):
    """Branches of one tree, depth first (the + child and its subtree before the - child)."""
    branches = []  # (depth, start p, unit direction u, length L)

    def grow(p, a, d):
        r1 = _draw_r(rnd)
        L = 0.292 * 0.8 ** d * (1 + 0.2 * r1)
        u = np.array([math.cos(a), math.sin(a)])
        branches.append((d, p, u, L))
        if d + 1 < TREE_DEPTHS:
            end = p + u * L
            for sign in (+1, -1):
                r = _draw_r(rnd)  # each child's r is drawn just before that child is built
                grow(end, a + sign * 0.7 ** d * (1 + 0.2 * r), d + 1)

    grow(np.array(TREE_ORIGIN, dtype=np.float64), angle, 0)
    return branches


@functools.lru_cache(maxsize=None)
def _tree_branches():
    """{'A': [...], 'B': [...]} built from one RandomState(2), class A first."""
    rnd = np.random.RandomState(TREE_SEED)
    return {name: _build_tree(rnd, TREE_ANGLES[name]) for name in ('A', 'B')}


class GaussianMixture:
    """A 2D Gaussian mixture whose components come in 'branches' of J components that share weight and
    covariance and whose means lie on a line, mean_k = mid_b + tau_j v_b. That structure is what makes
    the exact score fast (see `_chunk`); the plain per-component arrays are exposed as well:

    weights [K] (sum 1), means [K, 2], covs [K, 2, 2] (float64 tensors), branch_of [K] (branch index),
    branch_depth [B], num_branches, leaf_branches (indices of the deepest branches).
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

    # ---- analytic moments --------------------------------------------------------------------
    def mean(self, sigma=0.0):
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self, sigma=0.0):
        m = self.mean()
        d = self.means - m
        c = (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)
        return c + float(sigma) ** 2 * torch.eye(2, dtype=torch.float64)

    # ---- sampling ----------------------------------------------------------------------------
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
            b = self._branch
            self._cache[key] = dict(
                mx=b['mid'][:, 0], my=b['mid'][:, 1], vx=b['dir'][:, 0], vy=b['dir'][:, 1],
                a=b['cov'][:, 0, 0], b=b['cov'][:, 0, 1], c=b['cov'][:, 1, 1],
                logw=b['logw'] - LOG_2PI,
                # logit_j = c0 + tau_j beta - tau_j^2 gamma / 2  ->  [beta, gamma, c0] @ M
                M=torch.stack([self.tau, -0.5 * self.tau ** 2, torch.ones_like(self.tau)]),
                # responsibilities @ [1, tau_j] -> per-branch R = sum_j r_j, T = sum_j r_j tau_j
                N=torch.stack([torch.ones_like(self.tau), self.tau], dim=1),
            )
            self._cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._cache[key].items()}
        return self._cache[key]

    def _chunk(self, x, s2, p, want_score=True, want_argmax=False):
        """Exact log p and score of points x [n, 2] at variances s2 [n, 1] (sigma^2).

        Branch b, component j: mean m_b + tau_j v_b, covariance S_b + s2 I = [[A, b], [b, C]] with
        A = a + s2, C = c + s2; closed-form 2x2 inverse P = [[C, -b], [-b, A]] / det. With e = x - m_b:
        (x - mu_j)^T P (x - mu_j) = alpha - 2 tau_j beta + tau_j^2 gamma, alpha = e^T P e, beta = v^T P e,
        gamma = v^T P v, so the [n, B, J] logits are one small matmul of per-branch quantities, followed
        by a log-sum-exp; score = -sum_j r_j P (x - mu_j) = -sum_b P_b (R_b e_b - T_b v_b) (R, T: sums of
        the responsibilities r_j and r_j tau_j over the branch's components).
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
        logits = torch.stack([beta, gamma, c0], dim=2) @ p['M']  # [n, B, J]
        n = len(x)
        flat = logits.view(n, -1)
        top, arg = flat.max(dim=1, keepdim=True)
        if want_argmax:
            return arg[:, 0]
        flat.sub_(top).exp_()  # in place: the chunk's largest buffer is touched as few times as possible
        total = flat.sum(dim=1, keepdim=True)
        logp = (top + total.log())[:, 0]
        if not want_score:
            return logp, None
        RT = logits @ p['N']  # [n, B, 2]
        R = RT[:, :, 0]
        T = RT[:, :, 1]
        sx = (T * pvx - R * pex).sum(1, keepdim=True)
        sy = (T * pvy - R * pey).sum(1, keepdim=True)
        return logp, torch.cat([sx, sy], dim=1) / total

    def _run(self, x, sigma, want_score, want_argmax=False, dtype=None, chunk=256):
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f'expected points of shape [n, 2], got {list(x.shape)}')
        dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
        xd = x.detach().to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if torch.any(sigma < 0) or not torch.all(torch.isfinite(sigma)):
            raise ValueError('sigma must be finite and non-negative')
        s2 = sigma.square().reshape(-1, 1)
        s2 = s2.expand(len(x), 1)
        p = self._params(x.device, dtype)
        outs = [self._chunk(xd[i:i + chunk], s2[i:i + chunk], p, want_score, want_argmax)
                for i in range(0, len(x), chunk)]
        if want_argmax:
            return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long)
        logp = torch.cat([o[0] for o in outs]) if outs else xd.new_zeros(0)
        score = torch.cat([o[1] for o in outs]) if want_score and outs else (xd.new_zeros(0, 2) if want_score else None)
        return logp, score

    def logp(self, x, sigma=0.0, dtype=None):
        """log p(x; sigma) [n]; sigma is a scalar or an [n] tensor. Computed in float32 unless x is
        float64 or dtype says otherwise."""
        return self._run(x, sigma, want_score=False, dtype=dtype)[0]

    def pdf(self, x, sigma=0.0, dtype=None):
        return self.logp(x, sigma, dtype).exp()

    def score(self, x, sigma=0.0, dtype=None):
        """grad_x log p(x; sigma) [n, 2]."""
        return self._run(x, sigma, want_score=True, dtype=dtype)[1]

    def logp_and_score(self, x, sigma=0.0, dtype=None):
        return self._run(x, sigma, want_score=True, dtype=dtype)

    def nearest_branch(self, x, sigma=0.0):
        """Branch of the component with the largest posterior responsibility for each point (float64)."""
        comp = self._run(x.to(torch.float64), sigma, want_score=False, want_argmax=True)
        return self.branch_of.to(comp.device)[comp]

    def reference_logp_score(self, x, sigma=0.0):
        """Straightforward per-component evaluation in float64 (for tests and the benchmark baseline)."""
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
    """The exact ground-truth mixture of class 'A', 'B' or their union 'AB' (weights normalised jointly)."""
    if classes not in CLASSES:
        raise ValueError(f'unknown class {classes!r}; expected one of {", ".join(CLASSES)}')
    scale = np.array(TREE_SCALE)
    mids, dirs, covs, logw, depths = [], [], [], [], []
    for name in classes:
        for d, p, u, L in _tree_branches()[name]:
            h = 0.2 * 0.8 ** d / L                  # thickness
            s = scale * L * 0.06                    # size, per axis
            uu = np.outer(u, u)
            covs.append((uu + (np.eye(2) - uu) * h ** 2) * np.outer(s, s))
            mids.append((p + u * L * 0.5) * scale)  # means (p + u L t) scale, t = 0.5 + tau
            dirs.append(u * L * scale)
            logw.append(math.log(L * 0.5 ** d))
            depths.append(d)
    return GaussianMixture(mids, dirs, covs, logw, BRANCH_T - 0.5, depths, name=classes)


# ---- the toy denoiser ------------------------------------------------------------------------------

class ToyModel(torch.nn.Module):
    """MLP of magnitude-preserving linear layers that predicts log p(x; sigma) (SPEC section 8).

    Input [x / sqrt(sigma_data^2 + sigma^2), ln(sigma) / 4, 1]; one input layer, then `layers` times
    [mp_silu, linear]; y = the last layer's output. log p = g mean(y^2) / sigma - |x_in|^2 / 2 with a
    learned gain g initialised to 0 (so an untrained model is the Gaussian N(0, sigma_data^2 + sigma^2)).
    The score is the gradient of log p by autodiff.
    """

    def __init__(self, width=64, layers=4, sigma_data=SIGMA_DATA):
        super().__init__()
        if int(width) < 1 or int(layers) < 1:
            raise ValueError(f'width and layers must be positive, got width={width}, layers={layers}')
        self.init_kwargs = dict(width=int(width), layers=int(layers), sigma_data=float(sigma_data))
        self.sigma_data = float(sigma_data)
        self.layers = torch.nn.ModuleList([mp.MPConv(4, width, [])] +
                                          [mp.MPConv(width, width, []) for _ in range(layers)])
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def logp(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x)).reshape(-1, 1)
        x_in = x / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        y = torch.cat([x_in, sigma.log() / 4, torch.ones_like(sigma)], dim=1)
        y = self.layers[0](y)
        for layer in self.layers[1:]:
            y = layer(mp.mp_silu(y))
        return self.gain * y.square().mean(1) / sigma[:, 0] - 0.5 * x_in.square().sum(1)

    def score(self, x, sigma, create_graph=False):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logp = self.logp(x, sigma)
            return torch.autograd.grad(logp.sum(), x, create_graph=create_graph)[0]

    def forward(self, x, sigma):
        return self.score(x, sigma)


def learning_rate(iteration, lr=0.01, ref_iterations=512):
    """lr / sqrt(max(iteration / ref, 1)) (SPEC section 8; EDM2 eq. 65's inverse-square-root decay)."""
    return lr / math.sqrt(max(iteration / ref_iterations, 1))


def train(classes='A', width=64, layers=4, iterations=4096, batch=4096, lr=0.01, lr_ref=512,
          P_mean=-2.3, P_std=1.5, ema_std=0.010, seed=0, device='cpu', snapshots=(), progress=None):
    """Train a ToyModel by exact score matching against gt(classes) (SPEC section 8).

    Loss: sigma^2 * mean over the two coordinates of (score_gt - score_net)^2, ln sigma ~ N(P_mean, P_std^2),
    Adam (0.9, 0.99). Returns (ema_model, {iteration: ema_model copy} for the requested snapshot
    iterations, losses). The power-function EMA advances by one unit per iteration (Delta t = 1):
    beta = (1 - 1/t)^(gamma + 1) after the step that brings the count to t (SPEC section 4).
    """
    if classes not in CLASSES:
        raise ValueError(f'unknown class {classes!r}; expected one of {", ".join(CLASSES)}')
    if int(iterations) < 1 or int(batch) < 1:
        raise ValueError(f'iterations and batch must be positive, got {iterations}, {batch}')
    device = torch.device(device)
    mixture = gt(classes)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # weight initialisation
    net = ToyModel(width, layers).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    gamma = std_to_exp(ema_std)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    saved, losses = {}, []
    for it in range(int(iterations)):
        sigma = (torch.randn(batch, generator=gen) * P_std + P_mean).exp()
        x = mixture.sample(batch, sigma, gen)
        x, sigma = x.to(device), sigma.to(device=device, dtype=torch.float32)
        target = mixture.score(x, sigma)  # float32: max relative error ~1e-3 at sigma -> 0 (tested)
        pred = net.score(x, sigma, create_graph=True)
        loss = (sigma[:, None] ** 2 * (pred - target) ** 2).mean()
        for group in opt.param_groups:
            group['lr'] = learning_rate(it, lr, lr_ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        beta = (1 - 1 / (it + 1)) ** (gamma + 1)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - beta)
        losses.append(loss.item())
        if it + 1 in snapshots:
            saved[it + 1] = copy.deepcopy(ema)
        if progress is not None:
            progress(it, losses[-1])
    return ema, saved, losses


# ---- sampling ----------------------------------------------------------------------------------------

def guided_score(net, guide=None, w=1.0):
    """Score function of D_w = w D_1 + (1 - w) D_0 (SPEC section 5): score_w = w s_1 + (1 - w) s_0.

    guide=None means a guide whose score is zero (D_0(x) = x), i.e. naive truncation: the score is
    scaled by w. With w = 1 the guide is never evaluated.
    """
    def score(x, sigma):
        s1 = net.score(x, sigma)
        if w == 1:
            return s1
        s0 = guide.score(x, sigma) if guide is not None else torch.zeros_like(s1)
        return s1 * w + s0 * (1 - w)
    return score


class SmoothedGT:
    """An idealised model: the exact score of gt(classes) convolved with N(0, blur^2 I), i.e. the mixture at
    noise level sqrt(sigma^2 + blur^2). Its only error is a loss of resolution below `blur`, the kind of
    error the autoguidance paper argues a guide shares with the main model, only larger (blur = 0: exact)."""

    def __init__(self, classes='A', blur=0.0):
        if not 0 <= float(blur) < math.inf:
            raise ValueError(f'blur must be finite and non-negative, got {blur}')
        self.mixture = gt(classes)
        self.blur = float(blur)

    def score(self, x, sigma):
        return self.mixture.score(x, (sigma ** 2 + self.blur ** 2) ** 0.5)


# Idealised stand-ins for the three trained models of Figure 1: the guides lose twice the main model's resolution.
IDEAL_MAIN_BLUR = 0.02
IDEAL_GUIDE_BLUR = 0.04


def ideal_models(main_blur=IDEAL_MAIN_BLUR, guide_blur=IDEAL_GUIDE_BLUR):
    """{'net', 'autoguide', 'cfg_guide'} as SmoothedGT models (main: class A; guides: A and A+B)."""
    return dict(net=SmoothedGT('A', main_blur), autoguide=SmoothedGT('A', guide_blur),
                cfg_guide=SmoothedGT('AB', guide_blur))


def heun_sample(score_fn, x_init, num_steps=32, sigma_min=0.002, sigma_max=5.0, rho=7.0):
    """EDM Heun sampler (SPEC section 5, no churn) on a score: D(x; sigma) = x + sigma^2 score, so the ODE
    direction (x - D) / sigma is -sigma * score. x_init is already at noise level sigma_max."""
    t = edm_schedule(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    x = x_init
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d = -t_cur * score_fn(x, t_cur)
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:  # second-order correction on every step except the last
            d2 = -t_next * score_fn(x_next, t_next)
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
        x = x_next.detach()
    return x


# ---- evaluation ---------------------------------------------------------------------------------------

def outlier_level(mixture, num=200_000, mass=0.99, seed=12345):
    """The log-density level whose superlevel set holds `mass` of the ground truth (Monte Carlo, float64)."""
    gen = torch.Generator().manual_seed(seed)
    ref = mixture.sample(num, 0.0, gen, dtype=torch.float64)
    return float(torch.quantile(mixture.logp(ref), 1 - mass))


def evaluate(samples, mixture, level=None, half=0.5):
    """Metrics of samples [n, 2] against the exact ground truth `mixture` (at sigma = 0), all float64.

    outlier_rate: share of samples with log p below `level` (the 99%-mass level);
    leaf_coverage: share of leaf branches that receive at least `half` of their expected share of the
      in-distribution samples (each sample counts for the branch of its most responsible component);
    branch_tv: total-variation distance between the branch histogram of the in-distribution samples
      and the ground truth's branch masses (0 = identical, 1 = disjoint);
    mean_loglik: mean ground-truth log-likelihood of the samples.
    """
    if level is None:
        level = outlier_level(mixture)
    x = samples.detach().to('cpu', torch.float64)
    logp = mixture.logp(x)
    inlier = logp >= level
    branch = mixture.nearest_branch(x[inlier])
    counts = torch.bincount(branch, minlength=mixture.num_branches).to(torch.float64)
    expected = mixture.branch_weights
    q = counts / len(x)
    leaves = mixture.leaf_branches
    covered = (q[leaves] >= half * expected[leaves]).to(torch.float64).mean()
    q_in = counts / counts.sum().clamp_min(1)
    return dict(
        num_samples=len(x),
        outlier_rate=float(1 - inlier.to(torch.float64).mean()),
        leaf_coverage=float(covered),
        branch_tv=float(0.5 * (q_in - expected).abs().sum()),
        mean_loglik=float(logp.mean()),
        median_loglik=float(logp.median()),
    )


# ---- saving and loading -------------------------------------------------------------------------------

class ToyModelError(ValueError):
    """A toy model file is missing or is not one written by `save_model` (one-line message)."""


def save_model(path, net, **metadata):
    """Write net's weights and constructor arguments (safetensors + JSON metadata), atomically."""
    path = os.fspath(path)
    meta = {'format': 'edm2-toy-v1', 'init_kwargs': json.dumps(net.init_kwargs), 'metadata': json.dumps(metadata)}
    tensors = {k: v.detach().to('cpu', torch.float32).contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)


def load_model(path, device='cpu'):
    """(ToyModel in eval mode, metadata dict) from a file written by `save_model`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ToyModelError(f'{path}: toy model file not found (train one with `toy_example.py train`)')
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get('format') != 'edm2-toy-v1':
            raise ValueError('not a toy model')
        net = ToyModel(**json.loads(meta['init_kwargs']))
        net.load_state_dict(tensors)
        metadata = json.loads(meta.get('metadata', '{}'))
    except ToyModelError:
        raise
    except Exception as e:
        raise ToyModelError(f'{path}: not a toy model written by `toy_example.py train` ({type(e).__name__})') from None
    return net.to(device).eval().requires_grad_(False), metadata


# ---- the comparison of Figure 1 -------------------------------------------------------------------------

METHODS = ('ground truth', 'unguided', 'CFG', 'autoguidance', 'naive truncation')


def sample_methods(net, autoguide, cfg_guide, num=20000, seed=0, ag_weight=3.0, cfg_weight=4.0,
                   trunc_weight=1.5, num_steps=32, sigma_max=5.0, device='cpu', classes='A'):
    """Samples of every method of Figure 1, {name: [num, 2] float32 CPU tensor}.

    All guided/unguided methods start from the SAME initial points: ground truth of `classes` diffused to
    sigma_max (SPEC section 8). 'ground truth' is an independent draw of the clean mixture.
    """
    mixture = gt(classes)
    gen = torch.Generator().manual_seed(int(seed))
    x_init = mixture.sample(num, sigma_max, gen, device=device)
    reference = mixture.sample(num, 0.0, gen)
    runs = {
        'unguided': guided_score(net),
        'CFG': guided_score(net, cfg_guide, cfg_weight),
        'autoguidance': guided_score(net, autoguide, ag_weight),
        'naive truncation': guided_score(net, None, trunc_weight),
    }
    out = {'ground truth': reference}
    for name, score_fn in runs.items():
        out[name] = heun_sample(score_fn, x_init, num_steps=num_steps, sigma_max=sigma_max).to('cpu', torch.float32)
    return out
