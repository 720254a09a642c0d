"""EDM sampling (SPEC section 5)."""

import torch


def time_steps(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None, dtype=torch.float64):
    """The EDM noise levels sigma_0 > ... > sigma_{N-1} = sigma_min, followed by sigma_N = 0 (N+1 values).

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho  (EDM eq. 5).
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])
