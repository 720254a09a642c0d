"""Benchmark of the EDM2 network: forward and forward+backward images/s, eager vs torch.compile.

Default config (small enough for a CPU): the img64 XXS architecture (model_channels 64, channel_mult
[1,2,3,4], attention at 16x16 and 8x8, 1000 classes) at 32x32 resolution, batch 8, float32.
The eager float32 network is the baseline; torch.compile of the same network is measured in the
same run and reported as a ratio (or the reason it failed).

    python bench/network.py                                  # the default config
    python bench/network.py --size xs --resolution 64        # the published img64-XS network
    python bench/network.py --device cuda --precision fp16   # GPU, reduced precision
    python bench/network.py --threads 1                      # busy shared CPU: avoids OpenMP stalls

On a shared 2-core machine (load ~4) this config measured 9.1 img/s forward and 3.0 img/s
forward+backward with 1 thread, but 0.7 and 0.2 img/s with 2 threads: OpenMP synchronisation stalls
when other processes hold the cores.
"""

import copy
import os
import platform
import time

import click
import torch

from edm2 import runtime
from edm2.networks import build_network
from machine import cpu_model  # bench/machine.py


def _time(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median: robust against a busy shared machine


def _measure(net, x, sigma, labels, iters, warmup, device):
    def fwd():  # as in sampling: eval mode, no autograd
        net.eval()
        with torch.no_grad():
            net(x, sigma, labels)

    def fwd_bwd():  # as in training: training mode (forced weight normalisation), loss-like backward
        net.train()
        D, logvar = net(x, sigma, labels, return_logvar=True)
        (D.square().mean() + logvar.mean()).backward()
    return _time(fwd, iters, warmup, device), _time(fwd_bwd, iters, warmup, device)


@click.command()
@click.option('--size', default='xxs', show_default=True, help='Network size preset (configs/networks.toml).')
@click.option('--shape', default='img64', show_default=True, help='Shape preset: img64 (pixels) or img512 (latents).')
@click.option('--resolution', type=int, default=32, show_default=True, help='Override the image resolution.')
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--iters', type=int, default=5, show_default=True, help='Timed iterations (median reported).')
@click.option('--warmup', type=int, default=2, show_default=True)
@click.option('--device', default='cpu', show_default=True)
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), default='fp32', show_default=True,
              help='U-Net precision, on any device (edm2.runtime).')
@click.option('--compile/--no-compile', 'do_compile', default=True, show_default=True,
              help='Also measure torch.compile of the same network.')
@click.option('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default).')
def main(size, shape, resolution, batch, iters, warmup, device, precision, do_compile, threads):
    """Forward and forward+backward images/s of the EDM2 network."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(0)
    net = build_network(size, shape, img_resolution=resolution).to(device).train()
    net.precision = precision
    run = runtime.running(runtime.RunSettings(precision=precision))
    run.__enter__()  # for the rest of this process
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, net.img_channels, resolution, resolution, device=device)
    sigma = torch.exp(torch.randn(batch, device=device) * 1.2 - 0.4)
    labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, [batch], device=device), net.label_dim).float() \
        if net.label_dim else None

    print(f'machine:   {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} '
          f'({torch.get_num_threads()} threads), python {platform.python_version()}, '
          f'load average {os.getloadavg()[0]:.1f}' if hasattr(os, 'getloadavg') else '')
    if device.type == 'cuda':
        print(f'device:    {torch.cuda.get_device_name(device)}')
    print(f'config:    size={size} shape={shape} resolution={resolution} channels={net.img_channels} '
          f'label_dim={net.label_dim} params={params / 1e6:.2f}M batch={batch} device={device} '
          f'precision={net.unet_dtype(device)} dropout=0')
    print(f'timing:    median of {iters} iterations after {warmup} warm-up; forward = eval mode without '
          f'autograd (sampling), forward+backward = training mode (training)')

    eager = _measure(net, x, sigma, labels, iters, warmup, device)
    print(f'eager:     forward {batch / eager[0]:8.2f} img/s   forward+backward {batch / eager[1]:8.2f} img/s')
    if not do_compile:
        return
    try:
        compiled = torch.compile(copy.deepcopy(net))
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled.eval()(x, sigma, labels)  # compile the inference graph (timed separately)
        compile_s = time.perf_counter() - t0
        comp = _measure(compiled, x, sigma, labels, iters, warmup, device)
    except Exception as e:  # noqa: BLE001 -- report any compiler failure and keep the eager numbers
        msg = str(e).strip().splitlines()
        print(f'compiled:  torch.compile failed: {type(e).__name__}: {msg[0] if msg else ""}')
        return
    print(f'compiled:  forward {batch / comp[0]:8.2f} img/s   forward+backward {batch / comp[1]:8.2f} img/s   '
          f'(first compile {compile_s:.0f} s)')
    print(f'ratio:     compiled / eager = {eager[0] / comp[0]:.2f}x forward, {eager[1] / comp[1]:.2f}x forward+backward')


if __name__ == '__main__':
    main()
