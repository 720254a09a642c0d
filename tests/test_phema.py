"""Power-function EMA: tracking, the post-hoc solver, streaming reconstruction, reconstruct_phema.py."""

import io

import numpy as np
import pytest
import torch

from edm2 import phema


# ----------------------------------------------------------------------------------------------------
# Scalars (SPEC section 4 check values and the official fixture).

def test_scalars_match_official(official):
    ref = torch.load(official('phema-scalars.pt'), weights_only=False)
    for std, gamma in zip(ref['stds'].tolist(), ref['exps'].tolist()):
        assert phema.std_to_exp(std) == pytest.approx(gamma, rel=1e-12)
        assert phema.exp_to_std(gamma) == pytest.approx(std, rel=1e-12)
    assert phema.power_function_beta(0.100, 8192, 1024) == pytest.approx(ref['beta_std0100_t8192_dt1024'], rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Tracker.

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        self.register_buffer('counter', torch.zeros([]))


def test_tracker_matches_closed_form_weights():
    # With equal batches t_k = k*dt, beta_k = (1 - 1/k)^(g+1), so the product of betas after step k is
    # (k/n)^(g+1) and the EMA after n steps is sum_k theta_k (k^(g+1) - (k-1)^(g+1)) / n^(g+1).
    torch.manual_seed(0)
    net = _Toy().double()
    ema = phema.PowerFunctionEMA(net, stds=(0.05, 0.2))
    n, dt = 40, 64
    traj = []
    for k in range(1, n + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) + k / 10)
            net.counter.fill_(k)
        traj.append([p.detach().clone() for p in net.parameters()])
        ema.update(cur_nimg=k * dt, batch_size=dt)
    for ema_net, std in ema.get():
        g = phema.std_to_exp(std)
        k = np.arange(1, n + 1, dtype=np.float64)
        w = (k ** (g + 1) - (k - 1) ** (g + 1)) / n ** (g + 1)
        for i, p in enumerate(ema_net.parameters()):
            expected = sum(wk * traj[kk][i] for kk, wk in enumerate(w))
            torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)
            assert not p.requires_grad
        assert ema_net.counter.item() == n  # buffers are copied, not averaged


def test_tracker_reset_and_state_dict_roundtrip():
    torch.manual_seed(1)
    net = _Toy()
    ema = phema.PowerFunctionEMA(net)
    assert [std for _, std in ema.get()] == [0.05, 0.1]
    with torch.no_grad():
        net.lin.weight.add_(1)
    ema.update(cur_nimg=2048, batch_size=1024)  # beta = 0.5^(g+1): a strict mix, not the weights
    assert not torch.equal(ema.emas[0].lin.weight, net.lin.weight)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = phema.PowerFunctionEMA(_Toy())
    other.load_state_dict(state)
    for (a, _), (b, _) in zip(ema.get(), other.get()):
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(pa, pb)
    ema.reset()
    for e, _ in ema.get():
        assert torch.equal(e.lin.weight, net.lin.weight)
    with pytest.raises(ValueError, match='stds'):
        phema.PowerFunctionEMA(_Toy(), stds=(0.05,)).load_state_dict(state)
    with pytest.raises(ValueError):
        phema.PowerFunctionEMA(_Toy(), stds=(0.3,))
