"""Benchmark of the toy example's bottleneck: the exact ground-truth score of a training batch.

Prints the time of one score evaluation of 4096 noisy points (ln sigma ~ N(-2.3, 1.5^2)) under the
1016-component class-A mixture (fast closed-form path in float32 and float64, and the straightforward
per-component einsum baseline), and of one full training iteration of the published main model
(width 64, batch 4096). Times are the best of --repeat runs; the machine load is printed alongside.

    python bench/toy.py
    python bench/toy.py --threads 1 --repeat 20
"""

import os
import time

import click
import torch

from edm2 import toy
from machine import cpu_model  # bench/machine.py


def best_of(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), sorted(times)[len(times) // 2]


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
        best, med = best_of(run, rep)
        print(f'  {name:<44s} best {best * 1e3:8.1f} ms   median {med * 1e3:8.1f} ms')
        return best

    t32 = timed('closed-form 2x2, float32 (used in training)', lambda: mixture.score(x, sigma))
    t64 = timed('closed-form 2x2, float64', lambda: mixture.score(x.double(), sigma.double()))
    tref = timed('per-component einsum, float64 (baseline)',
                 lambda: mixture.reference_logp_score(x.double(), sigma.double()), rep=max(2, repeat // 4))
    print(f'  speed-up vs baseline: float32 {tref / t32:.1f}x, float64 {tref / t64:.1f}x;'
          f' target <= 50 ms: {"met" if t32 <= 0.050 else "NOT met"}')

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
    print(f'  => published main model (4096 iterations) ~ {tit * 4096 / 60:.1f} min, '
          f'each guide (512 iterations, width 32) < {tit * 512 / 60:.1f} min')
    load = os.getloadavg() if hasattr(os, 'getloadavg') else ('?',)
    print(f'load average {load[0]:.2f} (at end; 2 = both cores busy)')


if __name__ == '__main__':
    main()
