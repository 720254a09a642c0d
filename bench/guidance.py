"""Benchmark of guidance rules and guides: peak memory of a self guide against none, and time per image of each.

Memory: a native snapshot of an EDM2 U-Net of a stated size is written once; `generate_images.py` then runs in
a fresh process per setting -- no guide, `--gnet self:pag`, and (for contrast) a real guide of the same size
(a second copy of the weights) -- and each reports its peak RSS above its own post-import baseline (psutil
sampling every 5 ms, cross-checked with the kernel's ru_maxrss). A self guide shares the main network's
parameters, so its peak must stay within 10% of the unguided one; the real guide's shows what a copy costs.

Time: in this process, the guided Heun sampler with a smaller network of the same shape, for every guide kind
(a real half-width guide, self:pag on every attention block or one, self:skip) and every rule (lerp, apg,
rescale), best of --repeats with the settings taken in turn; printed as seconds per image (CPU time of
this process on CPU, so that waiting for a core on a shared machine does not count; wall time on CUDA),
network evaluations per image and the ratio to the unguided sampler measured in the same run.

    python bench/guidance.py                      # CPU, 1 thread; 52M-parameter net for memory, 5.8M for time
    python bench/guidance.py --device cuda --batch 32 --steps 32
"""

import json
import os
import platform
import resource
import sys
import tempfile
import time

import click
from machine import PeakRSS, cpu_model, run_child  # bench/machine.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ARCH = dict(img_resolution=32, img_channels=3, label_dim=10, channel_mult=[1, 2, 3, 4], num_blocks=2,
            attn_resolutions=[16, 8])


def build(channels, seed):
    import torch

    from edm2.networks import build_network
    torch.manual_seed(seed)
    net = build_network(dict(ARCH, model_channels=channels))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)  # a fresh net outputs c_skip x; make the U-Net matter
    return net.eval().requires_grad_(False)


def child(args):
    """Runs in a fresh process: baseline RSS after imports, then generate_images.main, then the peak."""
    import torch

    import edm2.checkpoint  # noqa: F401  (part of the baseline, like the command's own imports)
    from edm2.commands import generate_images
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', torch.get_num_threads())))
    with torch.device('meta'):  # torch's meta kernels (used to check shapes while loading) load on first use
        torch.randn(1) * 2
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        generate_images.main(args, standalone_mode=False)
        seconds = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print('BENCH ' + json.dumps(dict(seconds=seconds, baseline=memory.baseline, peak=memory.peak, maxrss=maxrss)))


def memory_rows(channels, batch, steps, device):
    from edm2.checkpoint import save_network
    from edm2.encoders import StandardRGBEncoder
    with tempfile.TemporaryDirectory() as tmp:
        main_path, guide_path = os.path.join(tmp, 'main.safetensors'), os.path.join(tmp, 'guide.safetensors')
        net = build(channels, 0)
        save_network(main_path, net, StandardRGBEncoder())
        save_network(guide_path, build(channels, 1), StandardRGBEncoder())
        net_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        params = sum(p.numel() for p in net.parameters())
        del net
        common = ['--net', main_path, '--seeds', f'0-{batch - 1}', '--batch', str(batch), '--steps', str(steps),
                  '--device', device]
        settings = [('no guide', []), ('--gnet self:pag', ['--gnet', 'self:pag', '--guidance', '2']),
                    ('--gnet (a second network)', ['--gnet', guide_path, '--guidance', '2'])]
        rows = []
        for name, flags in settings:
            outdir = os.path.join(tmp, f'out{len(rows)}')
            rows.append((name, run_child(__file__, common + flags + ['--outdir', outdir], REPO)))
    return params, net_bytes, rows


def timing_rows(channels, batch, steps, repeats, device):
    import torch

    from edm2 import sampling
    from edm2.self_guides import parse_self_guide
    net, gnet = build(channels, 0).to(device), build(channels // 2, 1).to(device)
    noise = torch.randn([batch, 3, ARCH['img_resolution'], ARCH['img_resolution']], device=device)
    labels = torch.eye(10, device=device)[torch.arange(batch) % 10]
    sigmas = sampling.edm_schedule(steps)
    pag, pag_one = parse_self_guide('self:pag').bind(net), parse_self_guide('self:pag=dec.4x4_in0').bind(net)
    skip = parse_self_guide('self:skip=dec.4x4_in1').bind(net)
    settings = [
        ('unguided', 'lerp', None, 1.0),
        ('real guide (half width)', 'lerp', gnet, 2.0),
        ('real guide (half width)', 'apg:eta=0', gnet, 2.0),
        ('real guide (half width)', 'apg:eta=0,momentum=-0.5,threshold=15', gnet, 2.0),
        ('real guide (half width)', 'rescale:phi=0.7', gnet, 2.0),
        ('self:pag', 'lerp', pag, 2.0),
        ('self:pag', 'apg:eta=0', pag, 2.0),
        ('self:pag=dec.4x4_in0', 'lerp', pag_one, 2.0),
        ('self:skip=dec.4x4_in1', 'lerp', skip, 2.0),
    ]

    # On CPU the process's CPU time: on a machine shared with other jobs, waiting for a core is not counted.
    clock = time.perf_counter if device.type == 'cuda' else time.process_time

    def sample(guide, rule, weight):
        guidance = sampling.Guidance(guides=() if guide is None else (guide,), weight=weight, rule=rule)
        denoiser = guidance.denoiser(net)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = clock()
        sampling.heun_sampler(denoiser, noise, sigmas, labels)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return clock() - t0, denoiser.num_evals

    with torch.no_grad():
        sample(gnet, 'lerp', 2.0)  # warm-up
        best = [None] * len(settings)
        for _ in range(repeats):  # round robin, so that a busy spell of the machine hits every setting alike
            for k, (_, rule, guide, weight) in enumerate(settings):
                result = sample(guide, rule, weight)
                best[k] = result if best[k] is None or result[0] < best[k][0] else best[k]
        rows = [(name, rule, seconds / batch, evals) for (name, rule, _, _), (seconds, evals) in zip(settings, best)]
    params = sum(p.numel() for p in net.parameters()), sum(p.numel() for p in gnet.parameters())
    return params, rows


@click.command()
@click.option('--device', default='cpu', show_default=True)
@click.option('--memory-channels', type=int, default=96, show_default=True, help='model_channels of the memory net')
@click.option('--time-channels', type=int, default=32, show_default=True, help='model_channels of the timed net')
@click.option('--batch', type=int, default=4, show_default=True)
@click.option('--steps', type=int, default=8, show_default=True)
@click.option('--repeats', type=int, default=3, show_default=True)
@click.option('--threads', type=int, default=1, show_default=True,
              help='torch CPU threads here and in the children (on a busy machine more threads wait on each other)')
@click.option('--parts', type=click.Choice(['all', 'memory', 'time']), default='all', show_default=True)
@click.option('--child-args', type=str, hidden=True)
def main(device, memory_channels, time_channels, batch, steps, repeats, threads, parts, child_args):
    if child_args is not None:
        return child(json.loads(child_args))
    import psutil
    import torch
    torch.set_num_threads(threads)
    os.environ['BENCH_THREADS'] = str(threads)
    print(f'Machine: {cpu_model()}, {psutil.cpu_count()} logical CPUs, load average '
          f'{", ".join(f"{x:.1f}" for x in os.getloadavg())}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, python {platform.python_version()}'
          + (f', GPU {torch.cuda.get_device_name(device)}' if device.startswith('cuda') else ''))
    print(f'U-Net: {ARCH}; batch {batch}, {steps} Heun steps, device {device}')

    if parts in ('all', 'memory'):
        print_memory(memory_channels, batch, steps, device)
    if parts in ('all', 'time'):
        print_time(time_channels, batch, steps, repeats, device)


def print_memory(memory_channels, batch, steps, device):
    params, net_bytes, rows = memory_rows(memory_channels, batch, steps, device)
    print(f'\nPeak memory of generate_images.py (fresh process each; main net model_channels {memory_channels}, '
          f'{params / 1e6:.1f}M parameters, {net_bytes / 2**20:.0f} MiB in float32)')
    print(f'{"setting":28s} {"seconds":>8s} {"peak-base MiB":>14s} {"maxrss-base MiB":>16s} {"vs no guide":>12s}')
    base = rows[0][1]['peak'] - rows[0][1]['baseline']
    for name, r in rows:
        used = r['peak'] - r['baseline']
        print(f'{name:28s} {r["seconds"]:8.2f} {used / 2**20:14.1f} {(r["maxrss"] - r["baseline"]) / 2**20:16.1f} '
              f'{used / base:12.3f}')
    pag_ratio = (rows[1][1]['peak'] - rows[1][1]['baseline']) / base
    print(f'self:pag peak / no-guide peak: {pag_ratio:.3f} (target <= 1.10: no copy of the weights): '
          + ('yes' if pag_ratio <= 1.10 else 'NO'))


def print_time(time_channels, batch, steps, repeats, device):
    import torch
    device = torch.device(device)
    (main_params, guide_params), rows = timing_rows(time_channels, batch, steps, repeats, device)
    print(f'\nTime per image of the guided sampler (main net model_channels {time_channels}, '
          f'{main_params / 1e6:.2f}M parameters; real guide {time_channels // 2}, {guide_params / 1e6:.2f}M; '
          f'best of {repeats}, settings taken in turn)')
    print(('GPU wall' if device.type == 'cuda' else 'CPU') + ' seconds per image (process CPU time on CPU: time spent '
          'waiting for a core on a shared machine is not counted)')
    print(f'{"guide":26s} {"rule":40s} {"s/image":>8s} {"evals/image main+guide":>22s} {"vs unguided":>11s}')
    unguided = rows[0][2]
    for name, rule, seconds, evals in rows:
        counts = '+'.join(str(n) for n in evals)  # each call evaluates every image of the batch once
        print(f'{name:26s} {rule:40s} {seconds:8.4f} {counts:>22s} {seconds / unguided:11.2f}')


if __name__ == '__main__':
    main()
