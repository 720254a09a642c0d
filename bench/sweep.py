"""Benchmark of the autoguidance sweep (calculate_metrics.py sweep): seconds per cell split into
reconstruction, sampling and feature extraction, and peak memory against the stated network bound.

Writes two synthetic runs of native snapshots (a random walk of the weights tracked by the power-function
EMA at sigma_rel 0.05 and 0.10, several times), a main U-Net and a half-width guide, then

  1. time: a real sweep (guided Heun sampler, full-size Inception-v3 with random weights: the FID
     detector's cost, not its values) over a small grid, in this process; per cell: reconstruction
     seconds (amortised over the cells that use them), sampling and feature extraction;
  2. memory: fresh processes that run the same grid with the sampling replaced by a constant metric, so
     that only held networks count, at several --phema-batch values. Peak RSS above the baseline (after
     imports and snapshot discovery), sampled with psutil every 5 ms, is reported in networks and
     checked against (phema_batch + 2) main + all guide networks: the held main networks, the input being
     read and one transient (as in bench/phema.py), plus the held guides.

    python bench/sweep.py                          # 2 x 2 x 2 cells, 8 images, 8 steps
    python bench/sweep.py --figure docs            # instead: the figure of docs/sweep.md (4 x 3 x 4 cells, tiny detector)
"""

import json
import os
import platform
import sys
import tempfile

import click
from machine import PeakRSS, cpu_model, run_child  # bench/machine.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def net_kwargs(channels, resolution):
    return dict(img_resolution=resolution, img_channels=3, label_dim=0, model_channels=channels,
                channel_mult=[1, 2], num_blocks=2, attn_resolutions=[])


def make_run(folder, channels, resolution, seed, times=4, steps_per_time=4, step_images=512):
    """Snapshots of a random-walk 'training' at sigma_rel 0.05 and 0.10; returns the network's float32 bytes."""
    import torch

    from edm2.checkpoint import save_network
    from edm2.encoders import StandardRGBEncoder
    from edm2.networks import build_network
    from edm2.phema import PowerFunctionEMA
    os.makedirs(folder)
    torch.manual_seed(seed)
    net = build_network(net_kwargs(channels, resolution))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
    for step in range(1, times * steps_per_time + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
        nimg = step * step_images
        ema.update(cur_nimg=nimg, batch_size=step_images)
        if step % steps_per_time == 0:
            for ema_net, std in ema.get():
                save_network(os.path.join(folder, f'network-snapshot-{nimg // 1000:07d}-{std:.3f}.safetensors'),
                             ema_net, StandardRGBEncoder(), dtype=torch.float16, kimg=nimg // 1000, ema_std=std,
                             nimg=nimg)
    return 4 * (sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers()))


def sweep_config(main, guide, net_stds, gnet_stds, guidances, num, steps, batch, phema_batch, metrics=('fid',)):
    from edm2.sweep import run as sweep
    from edm2.sweep import source as sweep_source
    return sweep.SweepConfig(sweep_source.snapshot_source(main, None, net_stds, '--net'),
                             sweep_source.snapshot_source(guide, None, gnet_stds, '--gnet'), guidances, list(metrics),
                             num, steps=steps, batch=batch, phema_batch=phema_batch, ref_name='random')


def stand_ins(tmp, width_divisor=1):
    """An Inception-v3 with random weights (full size: the real detector's cost) and a random reference."""
    import numpy as np
    import torch

    from edm2.metrics import detectors as det_lib
    path = os.path.join(tmp, f'inception-random-{width_divisor}.pth')
    torch.save(det_lib.random_state_dict('inception', width_divisor=width_divisor), path)
    detector = det_lib.load_detector('inception', weights=path, device='cpu')
    rng = np.random.RandomState(0)
    dim = detector.feature_dim
    return {'inception': detector}, {'fid': {'mu': rng.randn(dim) * 0.01, 'sigma': np.eye(dim) * 0.01}}


def time_split(tmp, main, guide, args):
    from edm2.sweep import run as sweep
    detectors, reference = stand_ins(tmp)
    config = sweep_config(main, guide, args['net_std'], args['gnet_std'], args['guidance'], args['num'],
                          args['steps'], args['batch'], args['phema_batch'])
    result = sweep.run_sweep(config, os.path.join(tmp, 'time'), detectors=detectors, reference=reference,
                             device='cpu', progress=False)
    cells = result['cells']
    per = {k: sum(c['seconds'][k] for c in cells) / len(cells) for k in ('sampling', 'features', 'metrics', 'total')}
    per['reconstruction'] = result['seconds']['reconstruction'] / len(cells)
    return per, result, config


def child(args):
    """A fresh process: baseline RSS after imports and planning, then the sweep with a constant metric."""
    import torch

    from edm2.sweep import run as sweep
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', torch.get_num_threads())))
    import tqdm  # noqa: F401  (the sweep's own imports belong to the baseline)

    from edm2.checkpoint import load_snapshot
    from edm2.phema_reconstruct import _release_freed_memory
    config = sweep_config(args['main'], args['guide'], args['net_std'], args['gnet_std'], args['guidance'], 4, 1, 1,
                          args['phema_batch'])
    for source in (config.net, config.gnet):  # warm-up: first-use allocations of the loaders, then freed
        load_snapshot(source.inputs[0].source)
    _release_freed_memory()
    with PeakRSS() as memory:
        result = sweep.run_sweep(config, args['outdir'], cell_metrics=lambda cell, net, gnet: {'fid': 0.0},
                                 device='cpu', progress=False)
    print('BENCH ' + json.dumps(dict(baseline=memory.baseline, peak=memory.peak, counter=result['counter'],
                                     bound=config.memory_bound())))


def memory(tmp, main, guide, args, main_bytes, guide_bytes):
    rows = []
    for pb in args['phema_batches']:
        child_args = dict(args, main=main, guide=guide, phema_batch=pb, outdir=os.path.join(tmp, f'mem{pb}'))
        r = run_child(__file__, child_args, REPO)
        used = r['peak'] - r['baseline']
        held_main, held_guide = r['bound']
        bound = (held_main + 2) * main_bytes + held_guide * guide_bytes
        rows.append((pb, r['counter'], used, bound))
    return rows


def _list(text):
    return [float(v) for v in text.split(',')]


@click.command()
@click.option('--channels', type=int, default=32, show_default=True, help='model_channels of the main U-Net '
              '(the guide has half)')
@click.option('--resolution', type=int, default=16, show_default=True)
@click.option('--net-std', default='0.06,0.09', show_default=True)
@click.option('--gnet-std', default='0.05,0.08', show_default=True)
@click.option('--guidance', default='1.5,2.5', show_default=True)
@click.option('--num', type=int, default=8, show_default=True, help='images per cell')
@click.option('--steps', type=int, default=8, show_default=True)
@click.option('--batch', type=int, default=16, show_default=True)
@click.option('--phema-batches', default='1,2', show_default=True, help='--phema-batch values of the memory runs')
@click.option('--memory-channels', type=int, default=128, show_default=True,
              help='model_channels of the main U-Net of the memory runs (32x32; large enough that allocator noise '
              'is small beside a network)')
@click.option('--part', type=click.Choice(['time', 'memory', 'both']), default='both', show_default=True)
@click.option('--figure', metavar='DIR', default=None, help='Only write the figure of docs/sweep.md (a 4 x 3 x 4 sweep) to DIR')
@click.option('--child-args', type=str, hidden=True)
def main(channels, resolution, net_std, gnet_std, guidance, num, steps, batch, phema_batches, memory_channels, part,
         figure, child_args):
    if child_args is not None:
        return child(json.loads(child_args))
    import psutil
    import torch
    args = dict(resolution=resolution, net_std=_list(net_std), gnet_std=_list(gnet_std), guidance=_list(guidance),
                num=num, steps=steps, batch=batch, phema_batch=8,
                phema_batches=[int(b) for b in phema_batches.split(',')])
    with tempfile.TemporaryDirectory() as tmp:
        main_dir, guide_dir = os.path.join(tmp, 'main'), os.path.join(tmp, 'guide')
        main_bytes = make_run(main_dir, channels, resolution, 0)
        guide_bytes = make_run(guide_dir, channels // 2, resolution, 1)
        print(f'Machine: {cpu_model()}, {psutil.cpu_count()} logical CPUs, torch {torch.__version__}, '
              f'{torch.get_num_threads()} threads, python {platform.python_version()} (shared machine: absolute '
              f'times are noisy)')
        print(f'Main network: EDM2 U-Net {net_kwargs(channels, resolution)}, {main_bytes / 2**20:.2f} MiB float32; '
              f'guide: model_channels {channels // 2}, {guide_bytes / 2**20:.2f} MiB; 8 float16 snapshots each')
        if figure:
            write_figure(tmp, main_dir, guide_dir, figure)
            return
        if part in ('time', 'both'):
            cells = len(args['net_std']) * len(args['gnet_std']) * len(args['guidance'])
            print(f'Sweep: {cells} cells, {num} images per cell, {steps} Heun steps ({2 * steps - 1} evaluations of '
                  f'the main network and of the guide per image), batch {batch}, FID with a full-size Inception-v3')
            per, result, _ = time_split(tmp, main_dir, guide_dir, args)
            print('Seconds per cell: ' + ', '.join(f'{k} {per[k]:.3f}' for k in
                                                   ('reconstruction', 'sampling', 'features', 'metrics', 'total')) +
                  f'  (reconstruction: {result["counter"]["reconstructions"]} networks in '
                  f'{result["seconds"]["reconstruction"]:.3f} s, shared by the cells); metrics '
                  f'{100 * per["metrics"] / (per["total"] + per["reconstruction"]):.1f}% of a cell')
        if part in ('memory', 'both'):
            main_dir, guide_dir = os.path.join(tmp, 'main-mem'), os.path.join(tmp, 'guide-mem')
            main_bytes = make_run(main_dir, memory_channels, 32, 2)
            guide_bytes = make_run(guide_dir, memory_channels // 2, 32, 3)
            print(f'Memory runs: main U-Net {net_kwargs(memory_channels, 32)}, {main_bytes / 2**20:.1f} MiB float32; '
                  f'guide model_channels {memory_channels // 2}, {guide_bytes / 2**20:.1f} MiB; the same grid; '
                  f'bound = (phema_batch + 2) main + all guides')
            print(f'{"phema_batch":>11} {"reconstructions":>15} {"peak-base MiB":>13} {"bound MiB":>9} '
                  f'{"in main nets":>12} {"within":>6}')
            for pb, counter, used, bound in memory(tmp, main_dir, guide_dir, args, main_bytes, guide_bytes):
                print(f'{pb:>11} {counter["reconstructions"]:>15} {used / 2**20:>13.2f} {bound / 2**20:>9.2f} '
                      f'{used / main_bytes:>12.2f} {"yes" if used <= bound else "NO":>6}')


def write_figure(tmp, main_dir, guide_dir, folder):
    """The figure of docs/sweep.md: a 4 x 3 x 4 sweep, 8 images per cell, 4 steps, Inception at 1/16 width."""
    from edm2.sweep import report as sweep_report
    from edm2.sweep import run as sweep
    detectors, reference = stand_ins(tmp, width_divisor=16)
    config = sweep_config(main_dir, guide_dir, [0.05, 0.07, 0.09, 0.11], [0.05, 0.08, 0.11], [1.0, 1.5, 2.0, 2.5],
                          8, 4, 8, 8)
    outdir = os.path.join(tmp, 'figure')
    result = sweep.run_sweep(config, outdir, detectors=detectors, reference=reference, device='cpu', progress=False)
    best = sweep_report.best_cells(result['cells'], config.metrics)
    paths = sweep_report.figures(outdir, result['cells'], config.metrics, config.net.stds, config.gnet.stds, best)
    os.makedirs(folder, exist_ok=True)
    for path in paths or []:
        name = os.path.basename(path)
        with open(path, 'rb') as src, open(os.path.join(folder, name), 'wb') as dst:
            dst.write(src.read())
        print(f'Figure: {os.path.join(folder, name)}')


if __name__ == '__main__':
    main()
