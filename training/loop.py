"""The EDM2 training loop (SPEC sections 3 and 4).

One call of `training_loop(options)` trains (or resumes) the run in `options['outdir']`:

- data: `edm2.data.ImageFolderDataset`, read by DataLoader workers through `InfiniteSampler`,
  which gives every optimiser step the same B images whatever the number of processes and the
  per-process batch: global position p of step k is k*B + a*W*b + r*b + j for accumulation round a,
  rank r (of W) and row j (of b = batch_gpu). Positions index a fresh seeded permutation per epoch.
- noise: sigma and n for the B rows of step k come from one generator seeded by (seed, k), and each
  process takes its rows; so the loss of a step does not depend on W or b either, and a resumed run
  draws exactly what an uninterrupted one would. Dropout uses torch's global RNG, reseeded per step
  from (seed, k, rank).
- loss: `training.loss.EDM2Loss` summed over all elements, divided by the per-process batch B/W
  (DDP then averages over processes: the gradient is the mean over the B images), times --ls.
- optimiser: Adam (0.9, 0.99, eps 1e-8), learning rate
  lr(t) = lr_ref / sqrt(max(t / (decay*B), 1)) * min(t / rampup, 1), t = images seen before the step.
  Non-finite gradient elements are zeroed and counted.
- EMA: `edm2.phema.PowerFunctionEMA` on rank 0, one copy per sigma_rel, updated after every step;
  snapshots `network-snapshot-{kimg:07d}-{std:.3f}` via `edm2.checkpoint.save_network`.
- checkpoints: `training-state-{kimg:07d}.pt` (plain tensors and containers, torch.load(weights_only=True)),
  written under a temporary name and renamed; an existing run directory is resumed from its newest
  checkpoint that loads, after checking that the hyper-parameters are unchanged.
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written and the loop returns.
"""

import contextlib
import copy
import json
import math
import os
import re
import signal
import time

import numpy as np
import torch

from edm2 import distributed as dist
from edm2.fileio import atomic_write

OPTIONS_FILE = 'training_options.json'
STATE_PATTERN = re.compile(r'^training-state-(\d+)\.pt$')

# Options that determine the result: a resumed run must use the same values.
RESULT_KEYS = ('data', 'cond', 'batch', 'lr', 'decay', 'rampup', 'P_mean', 'P_std', 'dropout', 'channels',
               'network', 'precision', 'ls', 'seed', 'ema_stds')
# Everything else (duration, status/snapshot/checkpoint intervals, batch_gpu, workers, device, bench,
# snapshot_dtype) may change between sessions of the same run.

DEFAULTS = dict(
    outdir=None, data=None, cond=False, preset=None, duration=None, batch=2048, batch_gpu=None,
    channels=192, dropout=0.0, P_mean=-0.4, P_std=1.0, lr=0.01, decay=70000, rampup=10_000_000,
    precision='fp16', ls=1.0, bench=True, status=128 << 10, snapshot=8 << 20, checkpoint=128 << 20,
    seed=0, ema_stds=[0.050, 0.100], device=None, workers=2, snapshot_dtype='fp16', network={},
)


class TrainingError(ValueError):
    """A one-line, user-facing reason why training cannot start."""


# ----------------------------------------------------------------------------------------------
# Small pure helpers.

_NIMG_UNITS = {'': 1, 'k': 1000, 'K': 1000, 'Ki': 1 << 10, 'M': 1000 ** 2, 'Mi': 1 << 20,
               'G': 1000 ** 3, 'Gi': 1 << 30}


def parse_nimg(value):
    """Image counts written like 2048Mi, 128Ki, 10M, 8192 -> int."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r'\s*(\d+(?:\.\d*)?)\s*([kKMG]i?)?\s*', str(value))
    if not m or (m.group(2) or '') not in _NIMG_UNITS:
        raise ValueError(f'expected an image count like 2048Mi, 128Ki, 10M or 8192, got {value!r}')
    n = float(m.group(1)) * _NIMG_UNITS[m.group(2) or '']
    if n != int(n):
        raise ValueError(f'{value!r} is not a whole number of images')
    return int(n)


def format_nimg(n):
    for unit in ('Gi', 'Mi', 'Ki'):
        if n and n % _NIMG_UNITS[unit] == 0:
            return f'{n // _NIMG_UNITS[unit]}{unit}'
    return str(n)


def learning_rate(cur_nimg, batch, lr, decay, rampup):
    """SPEC section 3: inverse-square-root decay after `decay` batches, linear ramp over `rampup` images."""
    value = lr
    if decay > 0:
        value /= math.sqrt(max(cur_nimg / (decay * batch), 1))
    if rampup > 0:
        value *= min(cur_nimg / rampup, 1)
    return value


def _step_seed(seed, step, stream):
    # Distinct 63-bit seeds per (seed, step, stream) from numpy's SeedSequence hashing.
    return int(np.random.SeedSequence([seed % (1 << 32), step, stream]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1 << 31, 1]))


class InfiniteSampler(torch.utils.data.Sampler):
    """Dataset indices for this rank, forever, starting at optimiser step `start_step` (see module doc)."""

    def __init__(self, size, batch, batch_gpu, rank=0, world_size=1, seed=0, start_step=0):
        assert batch % (batch_gpu * world_size) == 0
        self.size, self.batch, self.batch_gpu = size, batch, batch_gpu
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self._perm_epoch, self._perm = None, None

    def _index(self, position):
        epoch, offset = divmod(position, self.size)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed % (1 << 32), epoch]).permutation(self.size)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def __iter__(self):
        step = self.start_step
        rounds = self.batch // (self.batch_gpu * self.world_size)
        while True:
            for a in range(rounds):
                base = step * self.batch + (a * self.world_size + self.rank) * self.batch_gpu
                for j in range(self.batch_gpu):
                    yield self._index(base + j)
            step += 1

    def __len__(self):  # DataLoader asks; the stream is endless
        return 1 << 62


def _ignore_stop_signals(_worker_id):
    # Ctrl-C reaches the whole process group, and torchrun sends SIGTERM to each rank's group: the main
    # process handles both (checkpoint, then clean exit) and shuts its workers down itself. Workers
    # whose main process dies exit on their own (DataLoader's parent watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Set-up and validation (everything here runs before anything is written).

def resolve_options(options):
    """Fill defaults and normalise types; returns a new JSON-able dict."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in options.items() if v is not None})
    for key in ('duration', 'status', 'snapshot', 'checkpoint', 'rampup'):
        if opts[key] is not None:
            opts[key] = parse_nimg(opts[key])
    opts['ema_stds'] = [float(s) for s in opts['ema_stds']]
    opts['network'] = dict(opts['network'] or {})
    if opts['data'] is not None:
        opts['data'] = os.path.abspath(str(opts['data']))
    if opts['outdir'] is not None:
        opts['outdir'] = str(opts['outdir'])
    return opts


def _check(cond, message):
    if not cond:
        raise TrainingError(message)


def validate(opts, world_size=1):
    """Open the dataset and check every option; returns (dataset, network kwargs, batch_gpu)."""
    from edm2.phema import std_to_exp
    from edm2.data import DatasetError, ImageFolderDataset

    _check(opts['outdir'], '--outdir is required')
    _check(opts['data'], '--data is required')
    _check(opts['duration'] is not None and opts['duration'] > 0, '--duration must be a positive image count')
    batch = opts['batch']
    _check(batch >= 1, f'--batch must be positive, got {batch}')
    for key in ('status', 'snapshot', 'checkpoint'):
        _check(opts[key] >= 0, f'--{key} must be a non-negative image count')
    _check(opts['precision'] in ('fp32', 'fp16', 'bf16'), '--precision must be fp32, fp16 or bf16')
    _check(opts['snapshot_dtype'] in ('fp16', 'fp32'), '--snapshot-dtype must be fp16 or fp32')
    _check(opts['ls'] > 0, '--ls must be positive')
    _check(0 <= opts['dropout'] < 1, '--dropout must be in [0, 1)')
    _check(opts['P_std'] > 0, '--P_std must be positive')
    _check(len(opts['ema_stds']) > 0, '--ema-stds needs at least one value')
    for std in opts['ema_stds']:
        try:
            std_to_exp(std)
        except ValueError as e:
            raise TrainingError(f'--ema-stds: {e}') from None
    batch_gpu = opts['batch_gpu'] or batch // world_size
    _check(batch_gpu >= 1 and batch % (world_size * batch_gpu) == 0,
           f'--batch={batch} is not divisible by {world_size} process(es) x --batch-gpu={batch_gpu}')

    try:
        dataset = ImageFolderDataset(opts['data'])
        if opts['cond']:
            _check(dataset.has_labels, f'--data {opts["data"]} has no class labels (dataset.json "labels"), '
                   f'but --cond=1 (the default) needs them; train unconditionally with --cond=0')
            dataset = ImageFolderDataset(opts['data'], use_labels=True)
    except DatasetError as e:
        raise TrainingError(f'--data: {e}') from None
    res = dataset.resolution
    _check(res >= 4 and res & (res - 1) == 0,
           f'--data: images are {res}x{res}; the U-Net needs a power-of-two resolution of at least 4')
    if dataset.is_latent:
        _check(dataset.num_channels == 8, f'--data: latent arrays have {dataset.num_channels} channels; '
               f'expected 8 (Stability VAE mean and std, see dataset_tool.py encode)')
    else:
        _check(dataset.num_channels in (1, 3), f'--data: images have {dataset.num_channels} channels; expected 1 or 3')
    _check(dataset.label_dim > 0 or not opts['cond'], '--data: --cond needs class labels in dataset.json')

    from edm2 import presets
    try:
        unet = dict(presets.load('networks').get('unet', {}))
    except presets.PresetError as e:
        raise TrainingError(str(e)) from None
    net_kwargs = dict(img_resolution=res, img_channels=4 if dataset.is_latent else dataset.num_channels,
                      label_dim=dataset.label_dim, use_fp16=opts['precision'] != 'fp32')
    net_kwargs.update(unet)
    net_kwargs.update(model_channels=opts['channels'], dropout=opts['dropout'])
    net_kwargs.update(opts['network'])
    levels = len(net_kwargs.get('channel_mult', [1]))
    _check(res >> (levels - 1) >= 1, f'--data: {res}x{res} images are too small for {levels} U-Net levels')
    return dataset, net_kwargs, batch_gpu


def compare_options(old, new):
    """Names and values of the result-determining options that differ ('' when none)."""
    diffs = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in RESULT_KEYS if old.get(k) != new.get(k)]
    return '; '.join(diffs)


def _result_options(opts):
    return {k: opts[k] for k in RESULT_KEYS}


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_torch_save(obj, path):
    with atomic_write(path, fsync=True) as f:
        torch.save(obj, f)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


def list_checkpoints(outdir):
    """[(kimg, path)] of training-state files, newest first."""
    found = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = STATE_PATTERN.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(outdir, name)))
    return sorted(found, reverse=True)


def load_checkpoint(path):
    """The state dict of a training-state file (safe loading); raises on a damaged file."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('cur_nimg', 'net', 'optimizer', 'ema', 'options'):
        if key not in state:
            raise ValueError(f'missing {key!r}')
    return state


def find_resume_state(outdir, log):
    """Newest checkpoint of the run that loads, or None. Damaged files are reported and skipped."""
    for _kimg, path in list_checkpoints(outdir):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a torn or damaged file: fall back to the previous one
            log(f'Skipping unreadable checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}')
    return None, None


# ----------------------------------------------------------------------------------------------
# Output helpers.

class _Logger:
    """Status lines to the console (through tqdm when a bar is shown) and to log.txt, rank 0 only."""

    def __init__(self, path=None):
        self.file = open(path, 'a', encoding='utf-8') if (path and dist.is_main()) else None
        self.bar = None

    def __call__(self, msg):
        if not dist.is_main():
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
        if self.file is not None:
            self.file.write(msg + '\n')
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _format_time(seconds):
    s = int(seconds)
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    return f'{s // 3600}h {(s // 60) % 60:02d}m'


def _snapshot_network(ema_net, dtype):
    """CPU copy for storage: parameters in `dtype` (float16 as published), buffers unchanged."""
    net = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False)
    if dtype == 'fp16':
        for p in net.parameters():
            p.data = p.data.to(torch.float16)
    return net


def snapshot_name(kimg, std):
    return f'network-snapshot-{kimg:07d}-{std:.3f}'


# ----------------------------------------------------------------------------------------------

class _StopFlag:
    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def training_loop(options, dry_run=False, step_callback=None):
    """Train or resume the run described by `options` (see DEFAULTS); returns a summary dict.

    step_callback(cur_nimg), if given, is called after every optimiser step and EMA update (benchmarks).
    """
    requested = options.get('device')
    if requested is not None:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise TrainingError(f'--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1)') from None
        _check(dev.type != 'cuda' or torch.cuda.is_available(), f'--device {requested}: CUDA is not available here')
    device = dist.init(requested)
    opts = resolve_options(options)
    world = dist.get_world_size()
    dataset, net_kwargs, batch_gpu = validate(opts, world)
    batch = opts['batch']
    rounds = batch // (world * batch_gpu)
    outdir = opts['outdir']
    _check(not os.path.exists(outdir) or os.path.isdir(outdir), f'--outdir {outdir} exists and is not a folder')

    # Resuming: the stored options must agree on everything that determines the result.
    options_path = os.path.join(outdir, OPTIONS_FILE)
    if os.path.isfile(options_path):
        try:
            with open(options_path, encoding='utf-8') as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise TrainingError(f'cannot read {options_path}: {e}') from None
        diff = compare_options(old, _result_options(opts))
        _check(not diff, f'--outdir {outdir} holds a run with different settings ({diff}); '
               f'use a new --outdir or the original settings')

    from edm2.networks import build_network
    torch.manual_seed(opts['seed'])
    net = build_network(net_kwargs)  # built on the CPU from the seed: identical on every rank and device
    net.precision = opts['precision']
    num_params = sum(p.numel() for p in net.parameters())
    if dry_run:
        dist.print0(json.dumps(dict(opts, batch_gpu=batch_gpu, network_kwargs=net_kwargs,
                                    parameters=num_params, dataset_size=len(dataset)), indent=2))
        return dict(dry_run=True, parameters=num_params)

    # --- From here on, output is written. -------------------------------------------------------
    if dist.is_main():
        os.makedirs(outdir, exist_ok=True)
        for name in os.listdir(outdir):  # temporaries of a killed run (never renamed, so never used)
            if name.startswith('.') and name.endswith('.tmp') and ('training-state-' in name or 'network-snapshot-' in name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(outdir, name))
        if not os.path.isfile(options_path):
            tmp = options_path + '.tmp'
            with open(tmp, 'w', encoding='utf-8') as f:
                json.dump(_result_options(opts) | {'network_kwargs': net_kwargs}, f, indent=2)
            os.replace(tmp, options_path)
    dist.barrier()
    log = _Logger(os.path.join(outdir, 'log.txt'))
    stop = _StopFlag()
    try:
        return _train(opts, dataset, net, net_kwargs, batch_gpu, rounds, device, log, stop, num_params,
                      step_callback)
    finally:
        stop.restore()
        log.close()
        dataset.close()


def _train(opts, dataset, net, net_kwargs, batch_gpu, rounds, device, log, stop, num_params, step_callback=None):
    from edm2.phema import PowerFunctionEMA
    from training.loss import EDM2Loss

    world, rank = dist.get_world_size(), dist.get_rank()
    batch, outdir, seed = opts['batch'], opts['outdir'], opts['seed']
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = bool(opts['bench'])
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; reduced precision is --precision
        torch.backends.cudnn.allow_tf32 = False

    net.train().requires_grad_(True).to(device)
    optimizer = _adam(net.parameters(), lr=opts['lr'])
    ema = PowerFunctionEMA(net, stds=opts['ema_stds']) if dist.is_main() else None
    loss_fn = EDM2Loss(P_mean=opts['P_mean'], P_std=opts['P_std'], sigma_data=net.sigma_data)
    encoder = _make_encoder(dataset)  # latents need no VAE: encode() only samples and scales them

    # Resume from the newest valid checkpoint (rank 0 chooses; every rank loads the same file).
    cur_nimg = 0
    state_path, state = (find_resume_state(outdir, log) if dist.is_main() else (None, None))
    if world > 1:
        chosen = [state_path]
        torch.distributed.broadcast_object_list(chosen, src=0)
        if not dist.is_main() and chosen[0] is not None:
            state_path, state = chosen[0], load_checkpoint(chosen[0])
    if state is not None:
        diff = compare_options(json.loads(state['options']), _result_options(opts))
        _check(not diff, f'{state_path} was written with different settings ({diff})')
        net.load_state_dict(state['net'])
        optimizer.load_state_dict(state['optimizer'])
        if ema is not None:
            ema.load_state_dict(state['ema'])
        cur_nimg = int(state['cur_nimg'])
        rng = state.get('rng', {})
        if 'torch' in rng:
            torch.set_rng_state(rng['torch'])
        if device.type == 'cuda' and rng.get('cuda') is not None:
            torch.cuda.set_rng_state(rng['cuda'], device)
        log(f'Resuming from {state_path} at {cur_nimg} images ({cur_nimg // 1000} kimg)')
        _truncate_stats(os.path.join(outdir, 'stats.jsonl'), cur_nimg)
    elif ema is not None:
        ema.reset()
    del state
    _check(cur_nimg % batch == 0, f'checkpoint at {cur_nimg} images is not a multiple of --batch={batch}')

    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None)

    start_step = cur_nimg // batch
    sampler = InfiniteSampler(len(dataset), batch, batch_gpu, rank, world, seed, start_step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_gpu, sampler=sampler, num_workers=opts['workers'],
        pin_memory=device.type == 'cuda', worker_init_fn=_ignore_stop_signals if opts['workers'] else None,
        prefetch_factor=2 if opts['workers'] else None, persistent_workers=False)

    duration = opts['duration']
    log(f'Training {num_params / 1e6:.2f}M parameters on {len(dataset)} images {dataset.image_shape} '
        f'({"conditional, %d classes" % dataset.label_dim if opts["cond"] else "unconditional"}); '
        f'{world} process(es) on {device.type}, batch {batch} = {world} x {batch_gpu} x {rounds} round(s), '
        f'precision {opts["precision"]}; duration {format_nimg(duration)} images')
    if cur_nimg >= duration:
        log(f'Nothing to do: the run in {outdir} is already at {cur_nimg} images >= --duration {duration}')
        return dict(cur_nimg=cur_nimg, stopped=False)

    params = [p for p in net.parameters() if p.requires_grad]
    stats_acc = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, element count, non-finite
    noise_gen = torch.Generator(device=device)
    tick_start_nimg, tick_start_time, start_time = cur_nimg, time.time(), time.time()
    bar = None
    if dist.is_main():
        from tqdm import tqdm
        bar = tqdm(total=duration, initial=cur_nimg, unit='img', unit_scale=True, desc='train',
                   dynamic_ncols=True, mininterval=1.0)
        log.bar = bar
    stop.install()
    data_iter = iter(loader)
    stopped = False
    img_shape = (net.img_channels, net.img_resolution, net.img_resolution)
    try:
        while True:
            step = cur_nimg // batch
            # Noise for all B rows of this step, from (seed, step): independent of W and batch_gpu.
            noise_gen.manual_seed(_step_seed(seed, step, 0))
            rnd_normal = torch.randn([batch, 1, 1, 1], device=device, generator=noise_gen)
            eps = torch.randn([batch, *img_shape], device=device, generator=noise_gen)
            torch.manual_seed(_step_seed(seed, step, 1 + rank))  # dropout / latent sampling stream

            lr = learning_rate(cur_nimg, batch, opts['lr'], opts['decay'], opts['rampup'])
            for g in optimizer.param_groups:
                g['lr'] = lr
            for a in range(rounds):
                images, labels = next(data_iter)
                images = encoder.encode(images.to(device, non_blocking=True)).to(torch.float32)
                labels = labels.to(device, non_blocking=True) if opts['cond'] else None
                rows = slice((a * world + rank) * batch_gpu, (a * world + rank + 1) * batch_gpu)
                sync = contextlib.nullcontext() if (ddp is net or a == rounds - 1) else ddp.no_sync()
                with sync:
                    loss = loss_fn(ddp, images, labels, rnd_normal=rnd_normal[rows], eps=eps[rows])
                    loss.sum().mul(opts['ls'] / (batch // world)).backward()
                stats_acc[0] += loss.detach().sum().to(torch.float64)
                stats_acc[1] += loss.numel()

            grads = [p.grad for p in params if p.grad is not None]
            if opts['ls'] != 1:
                torch._foreach_mul_(grads, 1 / opts['ls'])
            # Non-finite gradients are replaced by zero (SPEC section 3); the fast check is one fused norm.
            if not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                for g in grads:
                    stats_acc[2] += (~g.isfinite()).sum()
                    torch.nan_to_num_(g, nan=0, posinf=0, neginf=0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prev_nimg, cur_nimg = cur_nimg, cur_nimg + batch
            if ema is not None:
                ema.update(cur_nimg=cur_nimg, batch_size=batch)
            if bar is not None:
                bar.update(batch)
            if step_callback is not None:
                step_callback(cur_nimg)

            # Agree on stopping (a signal may reach only some ranks).
            want_stop = stop.signum is not None
            if world > 1:
                flag = torch.tensor([float(want_stop)], device=device)
                dist.all_reduce_sum(flag)
                want_stop = bool(flag.item() > 0)
            done = cur_nimg >= duration

            def crossed(interval):
                return interval > 0 and cur_nimg // interval > prev_nimg // interval

            if crossed(opts['status']) or done or want_stop:
                dist.all_reduce_sum(stats_acc)
                now = time.time()
                loss_mean = float(stats_acc[0] / max(float(stats_acc[1]), 1))
                kimg_done = (cur_nimg - tick_start_nimg) / 1000
                sec_per_kimg = (now - tick_start_time) / max(kimg_done, 1e-9)
                rec = dict(kimg=cur_nimg / 1000, nimg=cur_nimg, time=now - start_time, sec_per_kimg=sec_per_kimg,
                           loss=loss_mean, lr=lr, nonfinite=int(stats_acc[2]),
                           cpu_mem_gb=_cpu_mem_gb(), gpu_mem_gb=_gpu_mem_gb(device))
                log(f'kimg {rec["kimg"]:<9.3f} time {_format_time(rec["time"]):<8s} '
                    f'sec/kimg {sec_per_kimg:<8.3f} loss {loss_mean:<8.4f} lr {lr:<9.3g} '
                    f'nonfinite {rec["nonfinite"]:<4d} cpumem {rec["cpu_mem_gb"]:<6.2f} gpumem {rec["gpu_mem_gb"]:.2f}')
                if dist.is_main():
                    with open(os.path.join(outdir, 'stats.jsonl'), 'a', encoding='utf-8') as f:
                        f.write(json.dumps(rec) + '\n')
                stats_acc.zero_()
                tick_start_nimg, tick_start_time = cur_nimg, time.time()
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)

            if dist.is_main() and (crossed(opts['snapshot']) or done):
                for ema_net, std in ema.get():
                    _save_snapshot(outdir, ema_net, std, encoder, cur_nimg, opts, net_kwargs)
            if crossed(opts['checkpoint']) or done or want_stop:
                if dist.is_main():
                    _save_checkpoint(outdir, net, optimizer, ema, cur_nimg, opts, device)
                dist.barrier()
            if want_stop:
                name = signal.Signals(stop.signum).name if stop.signum else 'a signal on another rank'
                log(f'Stopped by {name} at {cur_nimg} images; the checkpoint resumes the run')
                stopped = True
                break
            if done:
                break
    finally:
        if bar is not None:
            bar.close()
            log.bar = None
        del data_iter
    if not stopped:
        log(f'Done: {cur_nimg} images in {_format_time(time.time() - start_time)}')
    return dict(cur_nimg=cur_nimg, stopped=stopped)


def _adam(params, lr):
    """Adam (0.9, 0.99), eps 1e-8, no weight decay (SPEC section 3); the fused kernel where torch has one
    (several times faster than the per-tensor loop, which matters for small networks on the CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch or an unsupported device
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)


def _make_encoder(dataset):
    from edm2 import encoders
    if dataset.is_latent:
        return encoders.StabilityVAEEncoder()
    return encoders.StandardRGBEncoder()


def _cpu_mem_gb():
    try:
        import psutil
        return psutil.Process(os.getpid()).memory_info().rss / 2 ** 30
    except Exception:
        return float('nan')


def _gpu_mem_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return 0.0


def _truncate_stats(path, nimg):
    """Drop stats lines written after the checkpoint being resumed (they will be produced again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)['nimg'] <= nimg:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _save_snapshot(outdir, ema_net, std, encoder, cur_nimg, opts, net_kwargs):
    from edm2.checkpoint import save_network
    kimg = cur_nimg // 1000
    path = os.path.join(outdir, snapshot_name(kimg, std) + _native_suffix())
    save_network(path, _snapshot_network(ema_net, opts['snapshot_dtype']), encoder, kimg=kimg, ema_std=std,
                 nimg=cur_nimg, batch=opts['batch'], dataset=opts['data'], loss=dict(
                     P_mean=opts['P_mean'], P_std=opts['P_std'], sigma_data=ema_net.sigma_data))


def _native_suffix():
    from edm2 import checkpoint
    return getattr(checkpoint, 'NATIVE_SUFFIX', '.safetensors')


def _save_checkpoint(outdir, net, optimizer, ema, cur_nimg, opts, device):
    rng = {'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state(device)
    state = dict(
        format='edm2-training-state', version=1, cur_nimg=cur_nimg, step=cur_nimg // opts['batch'],
        options=json.dumps(_result_options(opts)),
        net={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        optimizer=_to_cpu(optimizer.state_dict()),
        ema=_to_cpu(ema.state_dict()),
        rng=rng,
        # The data stream is a function of (seed, position): position = images consumed.
        data=dict(position=cur_nimg, seed=opts['seed']),
    )
    atomic_torch_save(state, os.path.join(outdir, f'training-state-{cur_nimg // 1000:07d}.pt'))


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
