"""Benchmark of watching a run: what grids, metrics and loggers cost when off, and their share of the time when on.

In one process, on the same small configuration as bench/train_step.py:
  1. off: the training loop as every run has it (no --grid/--eval/--logger; only the per-σ loss buckets,
     which are always on), against the same loop with the buckets' accumulation replaced by nothing;
     the two alternate, and the per-step times (fastest and median) are compared;
  2. on: the loop with --grid, --eval (stand-in random-weight detectors, as the tests use) and
     --logger tensorboard at the given intervals; the share of the session's time spent watching, as
     the loop itself reports it in log.txt, and the wall-time ratio against the plain loop.

Usage:
  python bench/watching.py                       # CPU, float32, 16x16 images, 16 channels, batch 32
  python bench/watching.py --device cuda --res 64 --channels 64 --eval-num 1000
"""

import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time

import click
import torch
from machine import cpu_model  # bench/machine.py
from train_step import make_dataset  # bench/train_step.py

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_loop(opts, device):
    """(per-step seconds after 4 warm-up steps, whole-call seconds)."""
    from edm2.training import loop
    times, mark = [], [None]

    def on_step(cur_nimg):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if mark[0] is not None:
            times.append(now - mark[0])
        mark[0] = now

    start = time.perf_counter()
    loop.training_loop(opts, step_callback=on_step)
    return times[4:], time.perf_counter() - start


@click.command()
@click.option('--device', default='cpu', show_default=True)
@click.option('--res', type=int, default=16, show_default=True)
@click.option('--channels', type=int, default=16, show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--steps', type=int, default=40, show_default=True, help='Loop steps per measurement')
@click.option('--repeats', type=int, default=3, show_default=True, help='Alternations of the two "off" loops')
@click.option('--interval', type=int, default=1000, show_default=True, help='--grid and --eval of the "on" run')
@click.option('--eval-num', type=int, default=64, show_default=True)
def main(device, res, channels, batch, steps, repeats, interval, eval_num):
    from edm2.metrics import detectors as det_lib
    from edm2.training import loss_buckets
    from edm2.training.options import TrainingOptions

    torch.set_num_threads(1)
    device = torch.device(device)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix='bench-watching-'))
    try:
        data = make_dataset(tmp / 'data', 256, res, 10)
        common = dict(data=str(data), cond=True, batch=batch, channels=channels, lr=0.01, decay=0, rampup=0,
                      status=0, checkpoint=0, workers=1, device=str(device), precision='fp32',
                      network=dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))

        def opts(name, **kw):
            shutil.rmtree(tmp / name, ignore_errors=True)
            return TrainingOptions(outdir=str(tmp / name), **{**common, 'snapshot': 0, 'duration': steps * batch,
                                                              **kw})

        # 1. Off: the loop as is, against the loop without the per-σ accumulation (alternating).
        add = loss_buckets.add
        plain, bare = [], []
        for _ in range(repeats):
            plain += run_loop(opts('plain'), device)[0]
            loss_buckets.add = lambda *a: None
            try:
                bare += run_loop(opts('bare'), device)[0]
            finally:
                loss_buckets.add = add
        # 2. On: grids, evaluations and TensorBoard every `interval` images.
        inc = tmp / 'inception-tiny.pth'
        torch.save(det_lib.random_state_dict('inception', width_divisor=16), inc)
        from click.testing import CliRunner
        from edm2.commands import calculate_metrics
        ref = tmp / 'ref.pkl'
        r = CliRunner().invoke(calculate_metrics.cli, ['ref', '--data', str(data), '--dest', str(ref), '--metrics',
                                                       'fid', '--inception-weights', str(inc), '--workers', '0'])
        assert r.exit_code == 0, r.output
        duration = max(steps * batch, 3 * interval)
        _, off_wall = run_loop(opts('off', duration=duration, snapshot=interval), device)
        logger = ['tensorboard'] if _has('tensorboard') else []
        _, on_wall = run_loop(opts('on', duration=duration, snapshot=interval, grid=interval, eval=interval,
                                   eval_ref=str(ref), eval_num=eval_num, eval_stds=[0.05, 0.15],
                                   inception_weights=str(inc), logger=logger), device)
        log = (tmp / 'on' / 'log.txt').read_text()
        share = float(re.findall(r'Grids and metrics: .*?, ([\d.]+)% of this session', log)[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f'machine: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; device {device}; '
          f'load average {os.getloadavg()[0]:.1f} (shared machine: absolute times are noisy)')
    print(f'config: {res}x{res}x3, 10 classes, model_channels {channels}, channel_mult [1, 2], batch {batch}, '
          f'{steps} loop steps x {repeats} alternations')
    fp, fb = min(plain), min(bare)
    mp, mb = statistics.median(plain), statistics.median(bare)
    print(f'off: loop {fp * 1e3:.1f} ms/step (median {mp * 1e3:.1f}); without the per-sigma buckets {fb * 1e3:.1f} '
          f'ms/step (median {mb * 1e3:.1f}); ratio {fp / fb:.3f} fastest, {mp / mb:.3f} median')
    print(f'on: --grid/--eval every {interval} images (--eval-num {eval_num}, lengths 0.05 tracked and 0.15 '
          f'reconstructed, fid) and --logger {",".join(logger) or "none (tensorboard not installed)"} over '
          f'{duration} images: {share:.1f}% of the session spent watching (loop\'s own log); wall time '
          f'{on_wall:.1f} s vs {off_wall:.1f} s off ({on_wall / off_wall:.2f}x)')


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == '__main__':
    main()
