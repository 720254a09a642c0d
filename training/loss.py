"""The EDM2 training loss: denoising error weighted by λ(σ) and by the network's learned uncertainty.

EDM2 paper (Karras et al., CVPR 2024), config B: for clean data y, a noise level with
ln σ ~ N(P_mean, P_std²) and noise n ~ N(0, σ² I), every element contributes

    L = λ(σ) / e^{u(σ)} · (D(y + n; σ, c) − y)² + u(σ),      λ(σ) = (σ² + σ_d²) / (σ σ_d)²,

where λ(σ) = 1 / c_out(σ)² is EDM's weighting (EDM paper, Table 1), which weights the error of
the raw network output F equally at every σ, and u(σ) is the network's log-uncertainty head. For a fixed σ the
minimising u is the log of the expected weighted error, so dividing by e^{u} levels the loss
across noise levels (the homoscedastic-uncertainty weighting of Kendall et al., CVPR 2018).
"""

import torch

__all__ = ['EDM2Loss', 'edm_weight', 'uncertainty_weighted']


def edm_weight(sigma, sigma_data):
    """λ(σ) = (σ² + σ_d²) / (σ σ_d)², the inverse of c_out(σ)² (EDM paper, Table 1)."""
    return (sigma.square() + sigma_data ** 2) / (sigma * sigma_data).square()


def uncertainty_weighted(weight, logvar, squared_error):
    """(weight / e^{logvar}) · squared_error + logvar: a loss weight learned as a variance."""
    return (weight / logvar.exp()) * squared_error + logvar


class EDM2Loss:
    """Per-element EDM2 loss of a network with a log-uncertainty head (`return_logvar=True`).

        P_mean      mean of ln σ
        P_std       standard deviation of ln σ
        sigma_data  σ_d, the standard deviation of the data
    """

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def sample_noise(self, images, generator=None):
        """(rnd_normal [N,1,1,1], unit noise like images) drawn from `generator` in that order."""
        device = images.device
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=device, generator=generator)
        eps = torch.randn(images.shape, device=device, generator=generator)
        return rnd_normal, eps

    def sigma(self, rnd_normal):
        """σ = exp(P_mean + P_std z) for standard normal z: the log-normal noise levels."""
        return (self.P_mean + self.P_std * rnd_normal).exp()

    def __call__(self, net, images, labels=None, rnd_normal=None, eps=None, generator=None):
        """Per-element loss [N,C,H,W] in float32. The noise is (rnd_normal, eps) when both are
        given, else drawn from `generator` (or torch's global generator)."""
        clean = images.to(torch.float32)
        if rnd_normal is None or eps is None:
            rnd_normal, eps = self.sample_noise(clean, generator)
        sigma = self.sigma(rnd_normal)
        denoised, logvar = net(clean + sigma * eps, sigma, labels, return_logvar=True)
        squared_error = (denoised - clean).square()
        return uncertainty_weighted(edm_weight(sigma, self.sigma_data), logvar, squared_error)
