"""Benchmark of the toy example's bottleneck: the exact ground-truth score of a training batch.

Prints the time of one exact score evaluation of 4096 noisy points (class A, ln sigma ~ N(-2.3, 1.5^2) as
in training) under the 1016-component class-A mixture: our per-branch closed form (float32, as used in
training, and float64) against a fully vectorised baseline that evaluates every component at once (one
einsum over [points, components, 2, 2] building the precisions from precomputed per-component
eigendecompositions), all in the same run with the same thread count; then one full training iteration of
the published main model (width 64, batch 4096). Times are the best of --repeat runs; the machine load is
printed alongside (on a shared machine the ratio is the meaningful number, not the times).

    python bench/toy.py
    python bench/toy.py --threads 1 --repeat 20

It measures the `edm2` package Python imports (printed): run it where that is this checkout (an
editable install of it, or `PYTHONPATH=. python bench/toy.py`).
"""

import math
import os
import time

import click
import torch

from edm2 import toy
from machine import cpu_model  # bench/machine.py


def best_of(fn, repeat):
    """(best wall time, median wall time, best process CPU time) of `repeat` runs after a warm-up. On a
    shared machine the CPU time is the steadier measure (it excludes the time other processes hold the
    cores, though not the cache they evict)."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), sorted(wall)[len(wall) // 2], min(cpu)


def einsum_baseline(mixture, dtype, device):
    """Score of every component at once: precisions P = V diag(1 / (lambda + sigma^2)) V^T by one einsum over
    [points, components, 2, 2] from the precomputed eigendecompositions Sigma_k = V_k diag(lambda_k) V_k^T,
    then the responsibilities' log-sum-exp and score = -sum_k r_k P_k (x - mu_k)."""
    lam, V = torch.linalg.eigh(mixture.covs)
    lam, V, mu = lam.to(device, dtype), V.to(device, dtype), mixture.means.to(device, dtype)
    log_w = mixture.weights.log().to(device, dtype) - math.log(2 * math.pi)

    def score(x, sigma):
        var = lam[None] + sigma.square()[:, None, None]                     # [n, K, 2]
        P = torch.einsum('kia,nka,kja->nkij', V, var.reciprocal(), V)     # [n, K, 2, 2]
        d = x[:, None, :] - mu[None]                                       # [n, K, 2]
        Pd = torch.einsum('nkij,nkj->nki', P, d)
        logits = log_w - 0.5 * (var.log().sum(-1) + (d * Pd).sum(-1))
        r = torch.softmax(logits, dim=1)
        return -(r[:, :, None] * Pd).sum(1)
    return score


@click.command()
@click.option('--batch', default=4096, show_default=True, help='Points per score evaluation.')
@click.option('--repeat', default=10, show_default=True, help='Timed runs per measurement (best is reported).')
@click.option('--threads', default=None, type=int, help='torch threads (default: torch\'s choice).')
@click.option('--device', default='cpu', show_default=True)
def main(batch, repeat, threads, device):
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else ('?',)
    print(f'CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}, device {device}, load average {load[0]:.2f} (at start)')
    print(f'edm2.toy from {os.path.dirname(toy.__file__)}')
    mixture = toy.gt('A')
    gen = torch.Generator().manual_seed(0)
    sigma = (torch.randn(batch, generator=gen) * 1.5 - 2.3).exp()
    x = mixture.sample(batch, sigma, gen)
    x, sigma = x.to(device), sigma.to(device)
    print(f'score of {batch} points under the {len(mixture)}-component class-A mixture, per-point sigma:')

    def timed(name, fn, rep=repeat):
        def run():
            fn()
            sync()
        best, med, cpu = best_of(run, rep)
        print(f'  {name:<44s} best {best * 1e3:8.1f} ms   median {med * 1e3:8.1f} ms   CPU {cpu * 1e3:8.1f} ms')
        return best, cpu

    t32 = timed('per-branch closed form, float32 (training)', lambda: mixture.score(x, sigma))
    t64 = timed('per-branch closed form, float64', lambda: mixture.score(x.double(), sigma.double()))
    base = einsum_baseline(mixture, torch.float32, device)
    ref = mixture.score(x.double(), sigma.double())
    err = float(((base(x, sigma).double() - ref).norm(dim=1) / ref.norm(dim=1)).max())
    tref = timed('all components at once (einsum), float32', lambda: base(x, sigma), rep=max(2, repeat // 2))
    ratio, ratio64, ratio_cpu = tref[0] / t32[0], tref[0] / t64[0], tref[1] / t32[1]
    print(f'  speed-up vs the einsum baseline (wall): float32 {ratio:.1f}x, float64 {ratio64:.1f}x; CPU time: '
          f'float32 {ratio_cpu:.1f}x (target >= 10x: {"met" if min(ratio, ratio_cpu) >= 10 else "NOT met"}); '
          f'baseline max relative error {err:.1e}')

    # One full training iteration of the main model (width 64, 4 layers): sample, exact score, model score
    # with create_graph, loss, backward, Adam step, EMA update.
    net = toy.ToyModel(64, 4).to(device).train()
    ema = toy.ToyModel(64, 4).to(device).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99))

    def iteration():
        s = (torch.randn(batch, generator=gen) * 1.5 - 2.3).exp()
        xb = mixture.sample(batch, s, gen).to(device)
        s = s.to(device)
        target = mixture.score(xb, s)
        pred = net.score(xb, s, create_graph=True)
        loss = (s[:, None] ** 2 * (pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 0.01)

    tit = timed('one training iteration (width 64, batch 4096)', iteration)
    print(f'  => published main model (4096 iterations) ~ {tit[0] * 4096 / 60:.1f} min, '
          f'each guide (512 iterations, width 32) < {tit[0] * 512 / 60:.1f} min')
    load = os.getloadavg() if hasattr(os, 'getloadavg') else ('?',)
    print(f'load average {load[0]:.2f} (at end; 2 = both cores busy)')


if __name__ == '__main__':
    main()
