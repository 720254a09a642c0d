"""The EDM2 training loss with learned uncertainty (EDM2 paper, eq. 21 and appendix B.2; SPEC section 3).

Per element:  (lambda(sigma) / e^u(sigma)) * (D(y + n; sigma, c) - y)^2 + u(sigma),
with ln sigma ~ N(P_mean, P_std^2), n ~ N(0, sigma^2 I), lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
and u(sigma) = net's logvar head. Minimising over u drives e^u to the expected weighted error at sigma,
which balances the loss across noise levels (the "uncertainty" weighting of Kendall et al.).
"""

import torch


class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def sample_noise(self, images, generator=None):
        """(rnd_normal [N,1,1,1], unit noise like images) drawn from `generator` in that order."""
        n = images.shape[0]
        rnd_normal = torch.randn([n, 1, 1, 1], device=images.device, generator=generator)
        eps = torch.randn(images.shape, device=images.device, generator=generator)
        return rnd_normal, eps

    def __call__(self, net, images, labels=None, rnd_normal=None, eps=None, generator=None):
        """Per-element loss [N,C,H,W] in float32. Noise comes from (rnd_normal, eps) when given,
        else from `generator` (or torch's global RNG)."""
        images = images.to(torch.float32)
        if rnd_normal is None or eps is None:
            rnd_normal, eps = self.sample_noise(images, generator)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        sd = self.sigma_data
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        noisy = images + eps * sigma
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar
