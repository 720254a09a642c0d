"""Power-function EMA (EDM2 paper, section 3 and appendix C; SPEC section 4).

An EMA profile with exponent gamma averages the weights theta(tau) with density proportional to
tau**gamma on [0, t]. Its relative standard deviation sigma_rel is a function of gamma alone.
"""

import numpy as np

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0 limit: the uniform average over [0, t]


def exp_to_std(gamma):
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))."""
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def std_to_exp(std):
    """gamma = the largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0, s = sigma_rel."""
    std = float(std)
    if not 0 < std < SIGMA_REL_MAX:
        raise ValueError(f'EMA length sigma_rel={std} outside (0, {SIGMA_REL_MAX:.4f})')
    inv = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-6 * np.maximum(1, np.abs(roots))].real.max())


def power_function_beta(std, t_next, t_delta):
    """EMA decay for the step that brings the image count to t_next: beta = (1 - dt/t)^(gamma+1)."""
    gamma = std_to_exp(std)
    return float((1 - t_delta / t_next) ** (gamma + 1))
