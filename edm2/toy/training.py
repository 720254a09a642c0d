"""Training of the toy denoiser: exact score matching against the ground truth, Adam, an inverse square
root learning-rate decay and a power-function EMA (autoguidance paper, Appendix C; EDM2 paper sec. 3.1).
"""

import copy
import math

import torch

from edm2.phema import std_to_exp
from edm2.toy.mixture import ToyError, check_classes, gt
from edm2.toy.model import ToyModel


# Memory of `train` (peak RSS on the CPU, float32, measured at batch 400000 for widths 64/256 and 4/16
# layers): per sample of the batch about 1 kB plus 36 bytes per hidden unit and layer (activations kept for
# the double backward of the score); per weight 20 bytes (weight, gradient, two Adam moments, EMA copy);
# per iteration a float of the loss history.
ITERATION_BYTES = 32


def sample_bytes(width, layers):
    """Memory one sample of the training batch takes (bytes, measured; see above)."""
    return 1024 + 36 * width * layers


def training_bytes(width, layers, batch):
    """Memory of training a model (bytes): its weights with optimiser and EMA state, and one batch."""
    return layers * 20 * width * (width + 1) + batch * sample_bytes(width, layers)


def learning_rate(iteration, lr=0.01, ref_iterations=512):
    """lr / sqrt(max(iteration / ref, 1)) (EDM2 paper eq. 65's inverse-square-root decay)."""
    return lr / math.sqrt(max(iteration / ref_iterations, 1))


def ema_beta(iteration, gamma):
    """Power-function EMA decay of the update after step `iteration` (0-based), which brings the count to
    t = iteration + 1 with Delta t = 1: beta = (1 - 1/t)^(gamma + 1) (EDM2 paper sec. 3.1)."""
    return (1 - 1 / (iteration + 1)) ** (gamma + 1)


def score_matching_loss(net, x, sigma, target):
    """sigma^2 * mean over the two coordinates of (target - score_net)^2, averaged over the batch."""
    pred = net.score(x, sigma, create_graph=True)
    return (sigma[:, None] ** 2 * (pred - target) ** 2).mean()


def train_step(net, ema, opt, x, sigma, target, lr, beta):
    """One step: loss, gradients, Adam at learning rate `lr`, then ema <- beta ema + (1 - beta) net.
    Returns the loss (a 0-d tensor, detached)."""
    loss = score_matching_loss(net, x, sigma, target)
    for group in opt.param_groups:
        group['lr'] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.lerp_(p_net.detach(), 1 - beta)
    return loss.detach()


def make_optimizer(net, lr=0.01):
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))


def train(classes='A', width=64, layers=4, iterations=4096, batch=4096, lr=0.01, lr_ref=512,
          P_mean=-2.3, P_std=1.5, ema_std=0.010, seed=0, device='cpu', snapshots=(), progress=None):
    """Train a ToyModel by exact score matching against gt(classes).

    ln sigma ~ N(P_mean, P_std^2), points drawn from the ground truth diffused to sigma, target its exact
    score (float32). Returns (ema_model, {iteration: ema_model copy} for the requested snapshot
    iterations, losses)."""
    check_classes(classes)
    if int(iterations) < 1 or int(batch) < 1:
        raise ToyError(f'iterations and batch must be positive, got {iterations}, {batch}')
    device = torch.device(device)
    mixture = gt(classes)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # weight initialisation
    net = ToyModel(width, layers).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    gamma = std_to_exp(ema_std)
    opt = make_optimizer(net, lr)
    saved, losses = {}, []
    for it in range(int(iterations)):
        sigma = (torch.randn(batch, generator=gen) * P_std + P_mean).exp()
        x = mixture.sample(batch, sigma, gen)
        x, sigma = x.to(device), sigma.to(device=device, dtype=torch.float32)
        target = mixture.score(x, sigma)  # float32: max relative error ~1e-3 at sigma -> 0 (tested)
        loss = train_step(net, ema, opt, x, sigma, target, learning_rate(it, lr, lr_ref), ema_beta(it, gamma))
        losses.append(loss.item())
        if it + 1 in snapshots:
            saved[it + 1] = copy.deepcopy(ema)
        if progress is not None:
            progress(it, losses[-1])
    return ema, saved, losses
