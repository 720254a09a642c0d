"""Benchmark of post-hoc EMA reconstruction: time and peak memory of reconstruct_phema.py.

Writes M synthetic native snapshots (float16, like training snapshots) of a U-Net of a stated size,
then runs `reconstruct_phema.py` in a fresh process for N outputs at several --batch values. Each run
reports wall seconds, snapshot reads (counted by the library's `reads` counter), and the peak RSS
above the process's own baseline (RSS after imports, torch's meta kernels included), measured by psutil
sampling every 5 ms and cross-checked with the kernel's ru_maxrss.
The bound to check: peak - baseline <= (batch + 2) networks (float32 size), i.e. `batch` outputs, the
input being read and one transient (a loading buffer; outputs are streamed into their files, so writing
adds none: serialising a whole file in memory first cost one network more and broke the bound).

    python bench/phema.py                       # N=8 outputs from M=16 snapshots of a 26 MB network
    python bench/phema.py --channels 64 --outputs 16 --times 8 --batches 1,4,16
"""

import collections
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


def net_kwargs(channels):
    return dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=channels, channel_mult=[1, 2, 2],
                num_blocks=2, attn_resolutions=[8])


def make_snapshots(folder, channels, times, stds):
    import torch

    from edm2.checkpoint import save_network
    from edm2.networks import build_network
    torch.manual_seed(0)
    net = build_network(net_kwargs(channels))
    for k in range(1, times + 1):
        for std in stds:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p), alpha=0.01)
            kimg = k * 8192 // 1000
            save_network(os.path.join(folder, f'network-snapshot-{kimg:07d}-{std:.3f}.safetensors'), net,
                         None, dtype=torch.float16, kimg=kimg, ema_std=std)
    params = sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    return params * 4


def child(args):
    """Runs in a fresh process: baseline RSS after imports, then reconstruct_phema.main, then the peak."""
    import torch

    import edm2.checkpoint  # noqa: F401  (part of the baseline, like the command's own imports)
    from edm2.commands import reconstruct_phema
    from edm2 import phema_reconstruct
    reads = collections.Counter()
    streaming = phema_reconstruct.reconstruct_batches

    def counted(*a, **k):  # the command's own call, with the library's read counter attached
        return streaming(*a, reads=reads, **k)
    reconstruct_phema.phema_reconstruct.reconstruct_batches = counted
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', torch.get_num_threads())))
    with torch.device('meta'):  # torch imports its meta kernels (~75 MiB, once per process) on first use;
        torch.randn(1) * 2      # loading a checkpoint uses them to check shapes: part of the baseline
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        reconstruct_phema.main(args, standalone_mode=False)
        seconds = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print('BENCH ' + json.dumps(dict(seconds=seconds, baseline=memory.baseline, peak=memory.peak, maxrss=maxrss,
                                     reads=sum(reads.values()))))


@click.command()
@click.option('--channels', type=int, default=64, show_default=True, help='model_channels of the U-Net')
@click.option('--times', type=int, default=8, show_default=True, help='snapshot times (x 2 EMA lengths = M)')
@click.option('--outputs', type=int, default=8, show_default=True, help='N outputs, 0.04 ... evenly to 0.20')
@click.option('--batches', type=str, default='1,4,8', show_default=True, help='--batch values to run')
@click.option('--dtype', type=click.Choice(['float32', 'float16']), default='float32', show_default=True)
@click.option('--child-args', type=str, hidden=True)
def main(channels, times, outputs, batches, dtype, child_args):
    if child_args is not None:
        return child(json.loads(child_args))
    import psutil
    import torch

    stds = (0.050, 0.100)
    out_stds = [round(0.04 + (0.16 * j / max(outputs - 1, 1)), 4) for j in range(outputs)]
    with tempfile.TemporaryDirectory() as tmp:
        indir = os.path.join(tmp, 'in')
        os.makedirs(indir)
        net_bytes = make_snapshots(indir, channels, times, stds)
        m = times * len(stds)
        print(f'Machine: {cpu_model()}, {psutil.cpu_count()} logical CPUs, torch {torch.__version__}, '
              f'{torch.get_num_threads()} threads, python {platform.python_version()}')
        print(f'Network: EDM2 U-Net {net_kwargs(channels)}: {net_bytes / 2**20:.1f} MiB in float32 '
              f'({net_bytes / 4 / 1e6:.2f} M values); inputs: M={m} native float16 snapshots '
              f'({m} x {net_bytes / 2 / 2**20:.1f} MiB); outputs: N={outputs} in {dtype}')
        print(f'{"batch":>5} {"seconds":>8} {"s/output":>8} {"reads":>5} {"peak-base MiB":>13} '
              f'{"in networks":>11} {"bound":>5} {"maxrss-base":>11}')
        results = []
        for batch in [int(b) for b in batches.split(',')]:
            outdir = os.path.join(tmp, f'out{batch}')
            args = ['--indir', indir, '--outdir', outdir, '--outstd', ','.join(map(str, out_stds)),
                    '--batch', str(batch), '--dtype', dtype, '--device', 'cpu']
            r = run_child(__file__, args, REPO)
            used = (r['peak'] - r['baseline']) / net_bytes
            reads = r['reads']
            assert reads == -(-outputs // batch) * m, reads  # each input once per batch
            results.append((batch, r['seconds'], used))
            print(f'{batch:>5} {r["seconds"]:>8.2f} {r["seconds"] / outputs:>8.3f} {reads:>5} '
                  f'{(r["peak"] - r["baseline"]) / 2**20:>13.1f} {used:>11.2f} {batch + 2:>5} '
                  f'{(r["maxrss"] - r["baseline"]) / net_bytes:>11.2f}')
        if len(results) > 1:
            b0, s0, _ = results[0]
            print('Speed-up vs batch ' + str(b0) + ': ' +
                  ', '.join(f'batch {b}: {s0 / s:.2f}x' for b, s, _ in results[1:]))
        ok = all(used <= b + 2 for b, _, used in results)
        print('Peak memory within (batch + 2) networks: ' + ('yes' if ok else 'NO'))


if __name__ == '__main__':
    main()
