"""The device report: one command that measures the U-Net's fast path (edm2.runtime) on whatever device it finds.

Prints, with the machine and its load:
  1. parity: D(x; σ) of the fixture network in fp32 / bf16 / fp16 on the device against float64 on the CPU;
  2. forward and training-step (forward, backward, Adam) images/s and peak memory for the XS and S widths in
     fp32 / bf16 / fp16, eager and compiled (on a CPU: tiny sizes, see --cpu-size);
  3. Heun sampling images/s unguided and guided (a half-width guide), per precision;
  4. the training step again inside torch.distributed with one process (gloo on the CPU, nccl on CUDA);
  5. with --baseline REV: the network of git revision REV (e.g. the branch point) measured in the same
     rounds as today's, so that every ratio comes from one run under one load.
Every group interleaves its variants round by round (same load for all) and reports the fastest round.
What cannot run (fp16 on a CPU without the kernels, a compiler error, the time budget) is printed as skipped,
with the reason. Designed to finish within 8 minutes on one H100-class GPU.

    python bench/device.py                                    # the CPU, tiny sizes, 1 thread
    python bench/device.py --baseline ef177f0                 # also today's vs revision ef177f0 (the ratios)
    python bench/device.py --device cuda --baseline ef177f0   # the GPU report (XS and S, 64x64x4, batch 32)
"""

import contextlib
import copy
import os
import pathlib
import socket
import sys
import time

import click
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'bench'))

from baseline import networks_at, same_network  # noqa: E402  bench/baseline.py
from machine import PeakRSS, cpu_model  # noqa: E402  bench/machine.py

from edm2 import runtime, sampling  # noqa: E402
from edm2.networks import build_network, precond_coefficients  # noqa: E402
from edm2.training.loss import EDM2Loss  # noqa: E402
from edm2.training.optimizer import adam  # noqa: E402

PRECISIONS = ('fp32', 'bf16', 'fp16')
# The published widths (configs/networks.toml) and the shape of the ImageNet-512 latents, on a GPU.
GPU_SIZES = {'xs': dict(model_channels=128), 's': dict(model_channels=192)}
GPU_SHAPE = dict(img_resolution=64, img_channels=4, label_dim=1000)


class Report:
    """The printed table: rows as they are measured, skipped items with their reasons at the end."""

    def __init__(self, budget):
        self.start, self.budget, self.skipped = time.perf_counter(), budget, []

    def over_budget(self, what):
        if time.perf_counter() - self.start > self.budget:
            self.skip(what, f'time budget of {self.budget:.0f} s spent')
            return True
        return False

    def skip(self, what, why):
        self.skipped.append(f'{what}: {why}')
        print(f'  skipped {what}: {why}', flush=True)

    def row(self, *cells):
        print('  ' + ' '.join(cells), flush=True)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved(fns, rounds, device, warmup=1):
    """{name: fastest seconds} of each fn, running every fn once per round so that all see the same load; the
    fastest round is the least disturbed one on a shared machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict whose 'bytes' is set on exit: the peak of GPU memory allocated, or of the process RSS."""
    out = {}
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out['bytes'] = torch.cuda.max_memory_allocated(device)
    else:
        with PeakRSS() as rss:
            yield out
        out['bytes'] = rss.peak


def settings(precision=None, compiled=False, channels_last=None):
    return runtime.RunSettings(precision=precision, compile=compiled, channels_last=channels_last)


def supported(precision, device):
    """None, or why `precision` cannot run on `device`."""
    if precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return 'this GPU has no bfloat16'
    if precision == 'fp16' and device.type == 'cpu':
        try:
            x = torch.ones(1, 8, 4, 4, dtype=torch.float16)
            torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3, dtype=torch.float16), padding=1)
            torch.nn.functional.scaled_dot_product_attention(*[torch.ones(1, 1, 4, 8, dtype=torch.float16)] * 3)
        except RuntimeError as e:
            return f'no float16 kernels on this CPU build ({str(e).splitlines()[0][:80]})'
    return None


def inputs(net, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    res, ch = net.img_resolution, net.img_channels
    x = torch.randn(batch, ch, res, res, generator=g).to(device)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 0.4).to(device)
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, (batch,), generator=g)].to(device) \
        if net.label_dim else None
    return x, sigma, labels


# ----------------------------------------------------------------------------------------------------
# 1. Parity against float64 on the CPU.

def float64_denoise(net, x, sigma, labels):
    """D(x; σ) = c_skip x + c_out F(c_in x) with the U-Net in float64 on the CPU (EDM paper eq. 7)."""
    ref = copy.deepcopy(net).cpu().double()
    x, sigma = x.cpu().double(), sigma.cpu().double().reshape(-1, 1, 1, 1)
    coef = precond_coefficients(sigma, net.sigma_data)
    with runtime.running(settings(channels_last=False)):
        f = ref.unet(coef.c_in * x, coef.c_noise.flatten(), None if labels is None else labels.cpu().double())
    return coef.c_skip * x + coef.c_out * f


def parity(report, device):
    fixture = REPO / 'tests' / 'fixtures' / 'official' / 'main-rgb16.pkl'
    if fixture.exists():
        from edm2.checkpoint import load_snapshot
        net, what = load_snapshot(str(fixture))[0], 'the fixture network main-rgb16.pkl (published weights)'
    else:
        torch.manual_seed(0)
        net, what = build_network(dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                                       channel_mult=[1, 2], attn_resolutions=[8])), 'a random 16x16 network'
    net = net.eval().requires_grad_(False).to(device)
    x, sigma, labels = inputs(net, 8, device)
    with torch.no_grad():
        exact = float64_denoise(net, x, sigma, labels)
        print(f'\n1. parity: D(x; sigma) on {device} against float64 on the CPU, {what}, 8 inputs, sigma ~ lognormal')
        report.row(f'{"precision":10s} {"max |error| / max |D|":>22s} {"RMS error / RMS D":>18s}')
        for precision in PRECISIONS:
            why = supported(precision, device)
            if why:
                report.skip(f'parity {precision}', why)
                continue
            with runtime.running(settings(precision)):
                got = net(x, sigma, labels).cpu().double()
            err = got - exact
            report.row(f'{precision:10s} {float(err.abs().max() / exact.abs().max()):22.2e} '
                       f'{float(err.square().mean().sqrt() / exact.square().mean().sqrt()):18.2e}')


def image_parity(report, device, seeds=range(64), steps=32):
    """PNG levels of images sampled in each precision against float32: the share of pixel values within 0, 1,
    2 levels, guided by the fixture guide (w = 2) as in tests/fixtures/official/generate-rgb16.pt."""
    main_path = REPO / 'tests' / 'fixtures' / 'official' / 'main-rgb16.pkl'
    guide_path = main_path.with_name('guide-rgb16.pkl')
    if not main_path.exists():
        report.skip('image parity', 'the fixture networks are not in tests/fixtures/official')
        return
    from edm2 import generation
    from edm2.checkpoint import load_snapshot
    net, encoder, _ = load_snapshot(str(main_path), device=device)
    guide = load_snapshot(str(guide_path), device=device)[0]
    guidance = sampling.Guidance((guide.eval(),), 2.0)

    def images(precision):
        with torch.no_grad(), runtime.running(settings(precision)):
            batches = generation.generate(net.eval(), list(seeds), guidance=guidance, encoder=encoder,
                                          sigmas=sampling.edm_schedule(steps), batch_size=32, device=device)
            return torch.cat([b.images.cpu() for b in batches]).int()

    reference = images('fp32')
    print(f'   images: {len(seeds)} seeds, {steps} steps, guided w = 2 (fixture main + guide); share of the '
          f'{reference.numel()} pixel values within k levels of fp32')
    report.row(f'{"precision":10s} {"k = 0":>8s} {"k <= 1":>8s} {"k <= 2":>8s} {"k <= 4":>8s} {"max":>5s}')
    for precision in PRECISIONS[1:]:
        if supported(precision, device):
            continue
        diff = (images(precision) - reference).abs()
        shares = [float((diff <= k).float().mean()) * 100 for k in (0, 1, 2, 4)]
        report.row(f'{precision:10s} ' + ' '.join(f'{v:7.2f}%' for v in shares) + f' {int(diff.max()):5d}')


# ----------------------------------------------------------------------------------------------------
# 2. Forward and training step; 4. the same under torch.distributed.

def train_step_fn(net, batch_inputs, ddp=None):
    """One training step as training.loop takes it: EDM2 loss, backward, Adam step, zero grads."""
    loss_fn = EDM2Loss(sigma_data=net.sigma_data)
    opt = adam(net.parameters(), lr=1e-4)
    x, _, labels = batch_inputs
    g = torch.Generator(device=x.device)
    model = ddp if ddp is not None else net

    def step():
        g.manual_seed(0)
        rnd, eps = loss_fn.sample_noise(x, g)
        loss_fn(model, x, labels, rnd_normal=rnd, eps=eps).sum().div(x.shape[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward_fn(net, batch_inputs):
    def forward():
        with torch.no_grad():
            net.eval()(*batch_inputs)
    return forward


def network_shapes(device, cpu_res, cpu_channels):
    if device.type == 'cuda':
        return {size: dict(GPU_SHAPE, **kw) for size, kw in GPU_SIZES.items()}
    shape = dict(img_resolution=cpu_res, img_channels=3, label_dim=10, channel_mult=[1, 2, 2], num_blocks=1,
                 attn_resolutions=[cpu_res // 4])
    # 'tiny': the default network of bench/train_step.py (the training-step target of docs/performance.md).
    tiny = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[])
    return {'xs': dict(shape, model_channels=cpu_channels), 's': dict(shape, model_channels=cpu_channels * 3 // 2),
            'tiny': tiny}


def network_table(report, device, shapes, batch, rounds, compile_too, old_module):
    print(f'\n2. network: images/s (fastest of {rounds} interleaved rounds) and peak memory; training step = EDM2 '
          f'loss, backward, Adam; batch {batch}')
    report.row(f'{"size":5s} {"precision":9s} {"mode":9s} {"forward img/s":>14s} {"train img/s":>12s} '
               f'{"x fp32 eager":>13s} {"peak memory":>12s}')
    for size, kwargs in shapes.items():
        torch.manual_seed(0)
        base = build_network(kwargs).to(device)
        batch_inputs = inputs(base, batch, device)
        variants = {}
        if old_module is not None:
            variants['baseline fp32'] = (same_network(old_module, base), runtime.RunSettings(channels_last=False))
        modes = [('eager', False)] + ([('compiled', True)] if compile_too else [])
        for precision in PRECISIONS:
            why = supported(precision, device)
            if why:
                report.skip(f'{size} {precision}', why)
                continue
            for mode, compiled in modes:
                variants[f'{precision} {mode}'] = (copy.deepcopy(base), settings(precision, compiled))
            if precision != 'fp16':  # what the channels-last default gives: the same without it
                variants[f'{precision} NCHW'] = (copy.deepcopy(base), settings(precision, channels_last=False))
        if report.over_budget(f'network {size}'):
            continue
        fns, memory = {}, {}
        for name, (net, run_settings) in list(variants.items()):
            if run_settings.compile and report.over_budget(f'{size} {name}'):
                continue
            try:
                with runtime.running(run_settings), peak_memory(device) as peak:
                    fwd, step = forward_fn(net, batch_inputs), train_step_fn(net, batch_inputs)
                    if name.startswith('fp16') and device.type == 'cpu':
                        step = None
                    t0 = time.perf_counter()
                    fwd()
                    if step is not None:
                        step()  # compiles when compiled (forward graph, then training graphs)
                    first = time.perf_counter() - t0
                memory[name] = peak['bytes']
            except Exception as e:  # noqa: BLE001 -- a compiler failure is reported, the rest still measured
                report.skip(f'{size} {name}', f'{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}')
                continue
            fns[name + ' fwd'] = lambda fwd=fwd, s=run_settings: _under(s, fwd)
            if step is None:
                report.skip(f'{size} {name} training step', FP16_CPU_TRAINING)
            else:
                fns[name + ' train'] = lambda step=step, s=run_settings: _under(s, step)
            if 'compiled' in name:
                report.row(f'{size:5s} {name:19s} first forward + training step (compilation) {first:.1f} s')
        times = interleaved(fns, rounds, device)
        ref = times.get('fp32 eager train')
        for name in variants:
            if name + ' fwd' not in times:
                continue
            fwd, train = times[name + ' fwd'], times.get(name + ' train')
            precision, mode = name.split(' ', 1)
            ratio = f'{ref / train:.2f}x' if ref and train else '-'
            mem = f'{memory[name] / 2 ** 30:8.2f} GiB' if device.type == 'cuda' else 'n/a'
            train = f'{batch / train:12.1f}' if train else f'{"-":>12s}'
            report.row(f'{size:5s} {precision:9s} {mode:9s} {batch / fwd:14.1f} {train} {ratio:>13s} {mem:>12s}')
        if old_module is not None and 'baseline fp32 fwd' in times:
            for precision in PRECISIONS:
                for mode in ('eager', 'compiled'):
                    key = f'{precision} {mode}'
                    if key + ' fwd' not in times:
                        continue
                    train = f'{times["baseline fp32 train"] / times[key + " train"]:.2f}x' \
                        if key + ' train' in times else '-'
                    report.row(f'{size:5s} {key} against the baseline fp32: forward '
                               f'{times["baseline fp32 fwd"] / times[key + " fwd"]:.2f}x, training step {train}')


def _under(run_settings, fn):
    with runtime.running(run_settings):
        fn()


FP16_CPU_TRAINING = ('float16 convolution backward on the CPU is a slow fallback kernel (a training step '
                     'measured 0.01x float32); not timed, the tests still run it')


def distributed_table(report, device, shapes, batch, rounds):
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    print(f'\n4. torch.distributed, one process ({backend}): the training step through DistributedDataParallel')
    if report.over_budget('distributed'):
        return
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    try:
        torch.distributed.init_process_group(backend, rank=0, world_size=1,
                                             **(dict(device_id=device) if device.type == 'cuda' else {}))
    except Exception as e:  # noqa: BLE001
        report.skip('distributed', f'{backend}: {type(e).__name__}: {str(e).splitlines()[0][:100]}')
        return
    try:
        size, kwargs = next(iter(shapes.items()))
        torch.manual_seed(0)
        base = build_network(kwargs).to(device)
        batch_inputs = inputs(base, batch, device)
        fns = {}
        for precision in PRECISIONS:
            why = supported(precision, device) or (FP16_CPU_TRAINING if precision == 'fp16' and device.type == 'cpu'
                                                   else None)
            if why:
                report.skip(f'distributed {precision}', why)
                continue
            net = copy.deepcopy(base)
            ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
            fns[precision] = lambda step=train_step_fn(net, batch_inputs, ddp), s=settings(precision): _under(s, step)
        times = interleaved(fns, rounds, device)
        for precision, t in times.items():
            report.row(f'{size:5s} {precision:5s} DDP training step {batch / t:8.1f} img/s '
                       f'({times["fp32"] / t:.2f}x fp32)')
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# 3. Sampling.

def sampling_table(report, device, shape, batch, steps, rounds, old_module, compile_too=False):
    print(f'\n3. sampling: Heun, {steps} steps, batch {batch}, images/s (fastest of {rounds} interleaved rounds); '
          f'guide = the same architecture at half width, w = 2')
    if report.over_budget('sampling'):
        return
    torch.manual_seed(0)
    net = build_network(shape).eval().requires_grad_(False).to(device)
    gnet = build_network(dict(shape, model_channels=shape['model_channels'] // 2)).eval().requires_grad_(False)
    gnet = gnet.to(device)
    for n in (net, gnet):
        with torch.no_grad():
            n.unet.out_gain.fill_(1.0)
    noise, _, labels = inputs(net, batch, device)
    sigmas = sampling.edm_schedule(steps)

    def sampler(main, guide, run_settings):
        guidance = sampling.Guidance((guide,) if guide is not None else (), 2.0 if guide is not None else 1.0)

        def run():
            with torch.no_grad(), runtime.running(run_settings):
                sampling.heun_sampler(guidance.denoiser(main), noise, sigmas, labels,
                                      guided_steps=guidance.steps(sigmas))
        return run

    variants = {}
    if old_module is not None:
        old, old_guide = same_network(old_module, net).eval(), same_network(old_module, gnet).eval()
        variants['baseline fp32'] = (old, old_guide, runtime.RunSettings(channels_last=False))
    for precision in PRECISIONS:
        if supported(precision, device):
            report.skip(f'sampling {precision}', supported(precision, device))
            continue
        variants[precision] = (net, gnet, settings(precision))
        if compile_too and precision != 'fp16':
            variants[precision + ' compiled'] = (copy.deepcopy(net), copy.deepcopy(gnet), settings(precision, True))
    fns = {}
    for name, (main, guide, run_settings) in variants.items():
        fns[name + ' unguided'] = sampler(main, None, run_settings)
        fns[name + ' guided'] = sampler(main, guide, run_settings)
    for name, fn in list(fns.items()):
        if 'compiled' in name:
            if report.over_budget(f'sampling {name}'):
                del fns[name]
                continue
            t0 = time.perf_counter()
            try:
                fn()  # compiles
            except Exception as e:  # noqa: BLE001
                report.skip(f'sampling {name}', f'{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}')
                del fns[name]
                continue
            report.row(f'{name}: first run {time.perf_counter() - t0:.1f} s (compilation included)')
    variants = {name: v for name, v in variants.items() if name + ' unguided' in fns and name + ' guided' in fns}
    times = interleaved(fns, rounds, device)
    ref = 'baseline fp32' if old_module is not None else 'fp32'
    report.row(f'{"variant":18s} {"unguided img/s":>15s} {"guided img/s":>13s} {"x " + ref:>18s}')
    for name in variants:
        u, g = times[name + ' unguided'], times[name + ' guided']
        report.row(f'{name:18s} {batch / u:15.2f} {batch / g:13.2f} '
                   f'{times[ref + " unguided"] / u:8.2f}x / {times[ref + " guided"] / g:.2f}x')


@click.command()
@click.option('--device', default=None, help='cuda or cpu  [default: cuda if present]')
@click.option('--baseline', default=None, metavar='REV', help='Also measure the network of this git revision.')
@click.option('--threads', type=int, default=1, show_default=True, help='CPU threads (1: stable on a shared CPU)')
@click.option('--rounds', type=int, default=None, help='Interleaved rounds per group  [default: 5]')
@click.option('--budget', type=float, default=None,
              help='Seconds after which what remains (groups, compiled variants) is skipped  [default: 360 on '
                   'CUDA, so that the report fits in 8 minutes; 7200 on a CPU]')
@click.option('--sizes', default='xs,s,tiny', show_default=True, help='Networks of the network table (tiny: CPU only)')
@click.option('--skip', 'skip_groups', default='', metavar='LIST',
              help='Groups to leave out: parity, network, sampling, distributed')
@click.option('--compile/--no-compile', 'compile_too', default=True, show_default=True,
              help='Also measure torch.compile')
@click.option('--cpu-res', type=int, default=16, show_default=True, help='Resolution of the tiny CPU networks')
@click.option('--cpu-channels', type=int, default=32, show_default=True, help='model_channels of the CPU "xs"')
@click.option('--sampling-steps', type=int, default=None, help='[default: 32 GPU, 8 CPU]')
def main(device, baseline, threads, rounds, budget, sizes, skip_groups, compile_too, cpu_res, cpu_channels,
         sampling_steps):
    """Parity, speed and memory of the U-Net's precisions, layouts and compilation on this device."""
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())  # torch.distributed wants an index
    if threads:
        torch.set_num_threads(threads)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.benchmark = True
    rounds = rounds or 5
    steps = sampling_steps or (32 if device.type == 'cuda' else 8)
    report = Report(budget if budget is not None else 360 if device.type == 'cuda' else 7200)
    sizes, skip_groups = sizes.split(','), skip_groups.split(',')
    load = f'load average {os.getloadavg()[0]:.1f}' if hasattr(os, 'getloadavg') else ''
    print(f'machine: {cpu_model()}, {os.cpu_count()} CPUs, {load}; torch {torch.__version__}, '
          f'{torch.get_num_threads()} thread(s); device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''))
    print(f'defaults of edm2.runtime: channels-last {runtime.use_channels_last(device)}; fused attention (SDPA)')
    old_module = networks_at(baseline) if baseline else None
    if baseline and old_module is None:
        report.skip('baseline', f'git cannot show edm2/networks.py at {baseline}')

    if 'parity' not in skip_groups:
        parity(report, device)
        image_parity(report, device)
    shapes = network_shapes(device, cpu_res, cpu_channels)
    batch = 32
    if 'network' not in skip_groups:
        if device.type == 'cpu':
            report.skip('peak memory on the CPU', 'the process RSS only grows; it does not separate the variants')
        network_table(report, device, {k: v for k, v in shapes.items() if k in sizes}, batch, rounds, compile_too,
                      old_module)
    if 'sampling' not in skip_groups:
        sample_shape = shapes['xs'] if device.type == 'cuda' else dict(shapes['xs'], img_resolution=cpu_res * 2,
                                                                       attn_resolutions=[cpu_res // 2])
        sampling_table(report, device, sample_shape, batch if device.type == 'cuda' else 8, steps, rounds,
                       old_module, compile_too)
    if 'distributed' not in skip_groups:
        distributed_table(report, device, shapes, batch, rounds)
    print(f'\ndone in {time.perf_counter() - report.start:.0f} s; skipped: {len(report.skipped)}')
    for line in report.skipped:
        print(f'  - {line}')


if __name__ == '__main__':
    main()
