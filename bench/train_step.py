"""Benchmark of the training loop: sec/kimg, images/s, memory, and the loop's overhead.

The overhead is everything a training step does beyond the bare network forward + backward of the
EDM2 loss on ready-made inputs: reading and collating the batch, drawing the noise, the non-finite
gradient check, the Adam step, the power-function EMA update, and bookkeeping. It is measured two
ways in the same run:
  1. end to end: step time of the real loop (training.loop via train_edm2's options, read from its
     stats.jsonl after a warm-up interval) against the bare forward+backward step time measured in
     the same process before and after (alternating, medians);
  2. by parts: each component timed on its own, summed, divided by the loop's step time.
The loop must spend less than 15% of its step time outside the forward+backward.

Usage:
  python bench/train_step.py                      # default small config, CPU, float32
  python bench/train_step.py --device cuda --precision bf16 --res 64 --channels 128 --batch 64
"""

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import click
import numpy as np
import torch
from machine import cpu_model  # bench/machine.py

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_dataset(root, n, res, classes):
    import PIL.Image
    rnd = np.random.RandomState(0)
    root.mkdir(parents=True)
    labels = []
    for i in range(n):
        name = f'{i // 1000:05d}/img{i:08d}.png'
        (root / name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(rnd.randint(0, 256, (res, res, 3), dtype=np.uint8)).save(root / name)
        labels.append([name, i % classes])
    (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
    return root


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@click.command()
@click.option('--device', default='cpu', show_default=True)
@click.option('--precision', type=click.Choice(['fp32', 'fp16', 'bf16']), default='fp32', show_default=True)
@click.option('--res', type=int, default=16, show_default=True)
@click.option('--channels', type=int, default=16, show_default=True)
@click.option('--channel-mult', default='1,2', show_default=True)
@click.option('--num-blocks', type=int, default=1, show_default=True)
@click.option('--attn-res', default='', show_default=True, help='Attention needs widths >= 64 (64 channels per head)')
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--classes', type=int, default=10, show_default=True)
@click.option('--steps', type=int, default=40, show_default=True, help='Loop steps (the first 5 are warm-up)')
@click.option('--workers', type=int, default=2, show_default=True)
@click.option('--threads', type=int, default=1, show_default=True,
              help='torch CPU threads (0 = torch default); 1 is stable on a shared machine')
def main(device, precision, res, channels, channel_mult, num_blocks, attn_res, batch, classes, steps, workers, threads):
    import psutil

    from edm2 import runtime
    from edm2.networks import build_network
    from edm2.phema import PowerFunctionEMA
    from edm2.training import loop, stream
    from edm2.training.optimizer import adam
    from edm2.data import ImageFolderDataset
    from edm2.training.loss import EDM2Loss
    from edm2.training.options import TrainingOptions

    if threads:
        torch.set_num_threads(threads)
        os.environ['OMP_NUM_THREADS'] = str(threads)  # DataLoader workers too
    device = torch.device(device)
    mult = [int(v) for v in channel_mult.split(',')]
    attn = [int(v) for v in attn_res.split(',') if v]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix='bench-train-'))
    try:
        data = make_dataset(tmp / 'data', 512, res, classes)
        opts = TrainingOptions(outdir=str(tmp / 'run'), data=str(data), cond=True, duration=steps * batch,
                               batch=batch, channels=channels, lr=0.01, decay=0, rampup=0, status=0, snapshot=0,
                               checkpoint=0, workers=workers, device=str(device), precision=precision, precision_scope='all',
                               network=dict(channel_mult=mult, num_blocks=num_blocks, attn_resolutions=attn))

        # --- Bare forward + backward on ready inputs (same network, same loss). ---------------------
        torch.manual_seed(0)
        kwargs = dict(img_resolution=res, img_channels=3, label_dim=classes, use_fp16=precision != 'fp32',
                      model_channels=channels, channel_mult=mult, num_blocks=num_blocks, attn_resolutions=attn)
        net = build_network(kwargs).train().to(device)
        net.precision = precision
        runtime.running(runtime.RunSettings(precision=precision)).__enter__()  # the bare steps, as the loop runs
        loss_fn = EDM2Loss()
        x = torch.randn(batch, 3, res, res, device=device)
        y = torch.eye(classes, device=device)[torch.randint(classes, (batch,))]
        rnd = torch.randn(batch, 1, 1, 1, device=device)
        eps = torch.randn_like(x)

        def bare(n=10):
            times = []
            for _ in range(n):
                net.zero_grad(set_to_none=True)  # fresh gradients, as in the loop
                sync(device)
                t = time.perf_counter()
                loss_fn(net, x, y, rnd_normal=rnd, eps=eps).sum().backward()
                sync(device)
                times.append(time.perf_counter() - t)
            net.zero_grad(set_to_none=True)
            return times

        print('bare forward+backward...', file=sys.stderr, flush=True)
        bare(3)  # warm-up
        print('training loop, interleaved with bare steps...', file=sys.stderr, flush=True)

        # --- The real loop; after every loop step, one bare step (so both see the same machine load).
        loop_times, bare_times = [], []
        mark = [None]

        def on_step(cur_nimg):
            sync(device)
            if mark[0] is not None:
                loop_times.append(time.perf_counter() - mark[0])
            bare_times.extend(bare(1))
            mark[0] = time.perf_counter()

        peak_before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        loop.training_loop(opts, step_callback=on_step)
        loop_wall = time.perf_counter() - t0
        loop_times, bare_times = loop_times[4:], bare_times[5:]  # warm-up steps
        ratios = [1 - b / l for l, b in zip(loop_times, bare_times)]
        # Minimum = the least disturbed measurement on a shared machine; medians printed too.
        loop_step, bare_step = min(loop_times), min(bare_times)
        loop_median, bare_median = statistics.median(loop_times), statistics.median(bare_times)
        rss = psutil.Process().memory_info().rss

        print('components...', file=sys.stderr, flush=True)
        # --- Components on their own (fastest of 10 repetitions each). ----------------------------------
        def best(fn, n=10):
            times = []
            for k in range(n):
                sync(device)
                t = time.perf_counter()
                fn(k)
                sync(device)
                times.append(time.perf_counter() - t)
            return min(times)

        ds = ImageFolderDataset(data, use_labels=True)
        sampler = stream.InfiniteSampler(len(ds), batch, batch, seed=0)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=0))
        t_data_serial = best(lambda k: next(it)[0].to(device).float().div(127.5).sub(1))

        gen = torch.Generator(device=device)

        def noise(k):
            gen.manual_seed(k)
            torch.randn([batch, 1, 1, 1], device=device, generator=gen)
            torch.randn([batch, 3, res, res], device=device, generator=gen)
        t_noise = best(noise)

        opt = adam(net.parameters(), lr=1e-4)  # the loop's optimiser
        loss_fn(net, x, y, rnd_normal=rnd, eps=eps).sum().backward()
        grads = [p.grad for p in net.parameters()]
        opt.step()
        t_check = best(lambda k: bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()))
        t_adam = best(lambda k: opt.step())
        ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
        t_ema = best(lambda k: ema.update(cur_nimg=(k + 2) * batch, batch_size=batch))
        ds.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    overhead = statistics.median(ratios)  # per adjacent (loop step, bare step) pair: robust to load drift
    overhead_best = 1 - bare_step / loop_step
    parts_serial = t_noise + t_check + t_adam + t_ema  # data reading runs in workers, overlapped
    print(f'machine: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; '
          f'device {device}{" (" + torch.cuda.get_device_name(device) + ")" if device.type == "cuda" else ""}; '
          f'load average {os.getloadavg()[0]:.1f} (shared machine: absolute times are noisy)')
    print(f'config: {res}x{res}x3, {classes} classes, model_channels {channels}, channel_mult {mult}, '
          f'num_blocks {num_blocks}, attention at {attn}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M '
          f'parameters, batch {batch}, precision {precision}, DataLoader workers {workers}, {steps} loop steps')
    print(f'loop:  {loop_step * 1000:.1f} ms/step = {loop_step * 1000 / batch:.3f} sec/kimg = '
          f'{batch / loop_step:.1f} images/s (fastest of {len(loop_times)} steps; median {loop_median * 1000:.1f} ms; '
          f'whole call {loop_wall:.1f} s)')
    print(f'bare forward+backward: {bare_step * 1000:.1f} ms/step (fastest of {len(bare_times)}, one after each loop '
          f'step; median {bare_median * 1000:.1f} ms)')
    print(f'overhead beyond forward+backward: {100 * overhead:.1f}% of the loop step (median over adjacent pairs; '
          f'{100 * overhead_best:.1f}% from the fastest of each) (target < 15%)')
    print(f'components per step: data read+collate {t_data_serial * 1000:.2f} ms '
          f'({"in " + str(workers) + " worker(s), overlapped" if workers else "serial"}), noise {t_noise * 1000:.2f} ms, '
          f'non-finite check {t_check * 1000:.2f} ms, Adam {t_adam * 1000:.2f} ms, EMA (2 lengths) {t_ema * 1000:.2f} ms '
          f'-> {100 * parts_serial / loop_step:.1f}% of the loop step'
          f'{"" if workers else " + data " + format(100 * t_data_serial / loop_step, ".1f") + "%"}')
    mem = f'memory: process RSS {rss / 2 ** 30:.2f} GiB (before the loop {peak_before / 2 ** 30:.2f} GiB)'
    if device.type == 'cuda':
        mem += f', GPU peak allocated {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
    print(mem)
    print(json.dumps(dict(loop_ms=loop_step * 1e3, bare_ms=bare_step * 1e3, overhead=overhead,
                          sec_per_kimg=loop_step * 1000 / batch, images_per_s=batch / loop_step,
                          data_ms=t_data_serial * 1e3, noise_ms=t_noise * 1e3, check_ms=t_check * 1e3,
                          adam_ms=t_adam * 1e3, ema_ms=t_ema * 1e3, rss_gib=rss / 2 ** 30)))


if __name__ == '__main__':
    main()
