"""Benchmark of the guided Heun sampler (edm2.sampling).

Samples a batch with small random-weight EDM2 networks (speed does not depend on the weights) in three
settings -- unguided, guided by a smaller network, guided only inside a guidance interval -- and prints
  - images/s and network evaluations/s (one evaluation = one image through one network),
  - the share of the sampling time spent outside the networks (schedule, Heun arithmetic, guidance
    combination, churn noise, Python): the sampler's own overhead, which must stay below 5%,
  - ratios measured in the same run: guided / unguided time against the ratio of network work, and
    interval / guided time against the share of guide evaluations the interval keeps.

    python bench/sampling.py                          # CPU, 32x32x3 nets, batch 8, 16 steps
    python bench/sampling.py --device cuda --precision fp16 --res 64 --channels 128 --batch 64
"""

import argparse
import time

import torch

from edm2 import runtime, sampling
from edm2.networks import build_network
from machine import cpu_model  # bench/machine.py


class Timed(torch.nn.Module):
    """Wraps a network: accumulates the wall time spent inside it and the number of images evaluated."""

    def __init__(self, net, device):
        super().__init__()
        self.net, self.device = net, device
        for attr in ('img_channels', 'img_resolution', 'label_dim'):
            setattr(self, attr, getattr(net, attr))
        self.seconds, self.images = 0.0, 0

    def forward(self, x, sigma, labels=None):
        sync(self.device)
        t0 = time.perf_counter()
        y = self.net(x, sigma, labels)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.images += x.shape[0]
        return y


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run(net, gnet, noise, labels, gens, device, repeats, num_steps, weight=1.0, interval=None, **churn):
    """Best-of-`repeats` (total seconds, seconds inside networks, images evaluated per network)."""
    best = None
    sigmas = sampling.edm_schedule(num_steps)
    for _ in range(repeats):
        main, guide = Timed(net, device), Timed(gnet, device)
        g = [torch.Generator(device).manual_seed(i) for i in range(len(gens))]
        guidance = sampling.Guidance((guide,), weight, interval=interval)
        sync(device)
        t0 = time.perf_counter()
        sampling.heun_sampler(guidance.denoiser(main), noise, sigmas, labels, sampling.HeunOptions(**churn),
                              guided_steps=guidance.steps(sigmas), generators=g)
        sync(device)
        total = time.perf_counter() - t0
        result = (total, main.seconds + guide.seconds, main.images, guide.images)
        if best is None or total < best[0]:
            best = result
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'fp16', 'bf16'], help='U-Net dtype, on any device (edm2.runtime)')
    p.add_argument('--res', type=int, default=32)
    p.add_argument('--channels', type=int, default=32, help='model_channels of the main net (guide: half)')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=16)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runtime.running(runtime.RunSettings(precision=args.precision)).__enter__()  # for the rest of this process

    arch = dict(img_resolution=args.res, img_channels=3, label_dim=10, channel_mult=[1, 2, 2], num_blocks=2,
                attn_resolutions=[args.res // 4])
    torch.manual_seed(0)
    net = build_network(dict(arch, model_channels=args.channels)).eval().requires_grad_(False).to(device)
    gnet = build_network(dict(arch, model_channels=args.channels // 2)).eval().requires_grad_(False).to(device)
    for n in (net, gnet):
        n.precision = args.precision
        with torch.no_grad():
            n.unet.out_gain.fill_(1.0)
    noise = torch.randn([args.batch, 3, args.res, args.res], device=device)
    labels = torch.eye(10, device=device)[torch.arange(args.batch) % 10]
    gens = list(range(args.batch))
    common = dict(num_steps=args.steps, S_churn=10, S_min=0.05, S_max=50)
    interval = sampling.SigmaInterval(0.28, 2.9)

    print(f'machine: {cpu_model()}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}'
          + (f'; GPU {torch.cuda.get_device_name(device)}' if device.type == 'cuda' else ''))
    print(f'settings: device {device}, precision {args.precision}, '
          f'{args.res}x{args.res}x3, label_dim 10, channel_mult [1,2,2], 2 blocks/level, main model_channels '
          f'{args.channels} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params), guide '
          f'{args.channels // 2} ({sum(p.numel() for p in gnet.parameters()) / 1e6:.2f}M), batch {args.batch}, '
          f'{args.steps} steps with churn (S_churn 10, S_min 0.05, S_max 50), best of {args.repeats}')

    # Warm-up (allocations, kernel selection).
    run(net, gnet, noise, labels, gens, device, 1, **dict(common, num_steps=2), weight=2.0)

    rows = {}
    for name, kw in [('unguided', dict(weight=1.0)), ('guided w=2', dict(weight=2.0)),
                     (f'guided w=2, interval ({interval.lo}, {interval.hi}]', dict(weight=2.0, interval=interval))]:
        rows[name] = run(net, gnet, noise, labels, gens, device, args.repeats, **common, **kw)

    print(f'{"setting":36s} {"images/s":>9s} {"evals/s":>9s} {"main":>6s} {"guide":>6s} {"outside nets":>13s}')
    for name, (total, inside, n_main, n_guide) in rows.items():
        evals = n_main + n_guide
        print(f'{name:36s} {args.batch / total:9.2f} {evals / total:9.1f} {n_main // args.batch:6d} '
              f'{n_guide // args.batch:6d} {100 * (total - inside) / total:12.2f}%')

    (t_u, in_u, _, _), (t_g, in_g, _, g_g), (t_i, _, _, g_i) = rows.values()
    guide_cost = (in_g - in_u) / in_u  # time of the guide's evaluations relative to the main net's
    print(f'ratios: guided/unguided time {t_g / t_u:.3f} (network work ratio {in_g / in_u:.3f}; the guide costs '
          f'{guide_cost:.2f} of the main net); interval/guided time {t_i / t_g:.3f} '
          f'(guide evaluations kept: {g_i}/{g_g}, expected time ratio '
          f'{(1 + guide_cost * g_i / g_g) / (1 + guide_cost):.3f})')
    worst = max((total - inside) / total for total, inside, _, _ in rows.values())
    print(f'largest share of time outside the networks: {100 * worst:.2f}% (target < 5%)')


if __name__ == '__main__':
    with torch.no_grad():
        main()
