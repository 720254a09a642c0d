"""The settings of a training run: a typed dataclass, its ranges, and the checks made before any work.

`TrainingOptions` holds what `train_edm2.py` parses (or what a script passes directly); `prepare`
opens the dataset, resolves the network's constructor arguments and checks everything, so that bad
input is refused with one line naming the flag or file before anything is written. `settings` is
the resolved, JSON-able record of what determines the result; a resumed run must reproduce it.
"""

import dataclasses
import json
import math
import os
import re

import numpy as np

from edm2 import presets
from edm2.limits import check_range, memory_error, path_problem
from edm2.errors import EDM2Error
from edm2.network_config import NetworkConfigError, check_network_kwargs
from edm2.phema import std_to_exp
from edm2.data import DatasetError, ImageFolderDataset


class TrainingError(EDM2Error):
    """A one-line, user-facing reason why training cannot start or had to stop.

    `report` says which process of a torchrun job prints it: 'rank0' when every process meets the
    same error (validation, a non-finite loss agreed over ranks), 'self' for an error only this
    process met (its data worker failed), 'none' when this process stopped because another failed
    (that one reports the cause)."""

    def __init__(self, message, report='rank0'):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------
# Image counts and the meaningful range of every number (the command line uses the same table).

MAX_NIMG = 1 << 50  # far beyond any run; keeps image counts exact in int64 and float64
_NIMG_UNITS = {'': 1, 'k': 1000, 'K': 1000, 'Ki': 1 << 10, 'M': 1000 ** 2, 'Mi': 1 << 20,
               'G': 1000 ** 3, 'Gi': 1 << 30}

# flag -> (lo, hi, lo_open, hi_open) for floats, (lo, hi) inclusive for integers and image counts.
FLOAT_RANGES = {
    'lr': (0, 1, True, False),             # alpha_ref; the published values are 0.0065-0.017
    'decay': (0, 1e12, False, False),      # t_ref in batches; 0 = no decay
    'dropout': (0, 1, False, True),
    'P_mean': (-10, 10, False, False),     # mean of ln(sigma)
    'P_std': (0, 5, True, False),          # standard deviation of ln(sigma)
    'ls': (0, 1e6, True, False),           # loss scaling
    'grid_guidance': (0, 100, False, False),  # guidance weight w of the grid's autoguided rows
}
INT_RANGES = {
    'channels': (1, 4096), 'num_blocks': (1, 64), 'channel_mult': (1, 64), 'attn_res': (1, 1 << 16),
    'workers': (0, 256), 'seed': (0, (1 << 63) - 1),
    'grid_steps': (1, 10000), 'eval_steps': (1, 10000), 'eval_num': (2, 10 ** 8), 'eval_batch': (1, 1 << 16),
}
NIMG_RANGES = {
    'duration': (1, MAX_NIMG), 'batch': (1, 1 << 24), 'batch_gpu': (1, 1 << 24), 'rampup': (0, MAX_NIMG),
    'status': (0, MAX_NIMG), 'snapshot': (0, MAX_NIMG), 'checkpoint': (0, MAX_NIMG),
    'grid': (0, MAX_NIMG), 'eval': (0, MAX_NIMG),
}
LOGGERS = ('tensorboard', 'wandb')
MAX_GRID_SEEDS = 1024
MAX_LEVELS = 16          # U-Net levels (entries of --channel-mult)
MAX_PARAMS = 4 * 10 ** 9  # parameters; EDM2-XXL has 1.5 billion
MAX_SNAPSHOTS = 10 ** 6   # snapshot times in one run


def flag(name):
    """The command-line flag of an option field: 'batch_gpu' -> '--batch-gpu' ('--P_mean' keeps its case)."""
    return '--' + (name if name.startswith('P_') else name.replace('_', '-'))


def parse_nimg(value):
    """Image counts written like 2048Mi, 128Ki, 10M, 8192 -> int."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r'\s*(\d+(?:\.\d*)?)\s*([kKMG]i?)?\s*', str(value))
    if not m or (m.group(2) or '') not in _NIMG_UNITS:
        raise ValueError(f'expected an image count like 2048Mi, 128Ki, 10M or 8192, got {value!r}')
    n = float(m.group(1)) * _NIMG_UNITS[m.group(2) or '']
    if not math.isfinite(n) or n != int(n):
        raise ValueError(f'{value!r} is not a whole number of images')
    return int(n)


def format_nimg(n):
    for unit in ('Gi', 'Mi', 'Ki'):
        if n and n % _NIMG_UNITS[unit] == 0:
            return f'{n // _NIMG_UNITS[unit]}{unit}'
    return str(n)


def _names(value):
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (order kept, duplicates dropped)."""
    items = value.split(',') if isinstance(value, str) else value
    return list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def _check(cond, message):
    if not cond:
        raise TrainingError(message)


# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainingOptions:
    """Everything a run needs. Image counts accept the strings of `parse_nimg`; defaults are the
    published trainer's (EDM2-S on ImageNet-512 hyper-parameters)."""
    outdir: str
    data: str
    duration: int
    cond: bool = True
    batch: int = 2048
    batch_gpu: int | None = None        # per process per accumulation round; default batch / processes
    channels: int = 192
    dropout: float = 0.0
    P_mean: float = -0.4
    P_std: float = 1.0
    lr: float = 0.0100
    decay: float = 70000
    rampup: int = 10_000_000
    precision: str = 'fp16'             # U-Net precision on CUDA (and on every device with precision_scope 'all')
    precision_scope: str = 'cuda'       # 'cuda': the published rule (--fp16), float32 elsewhere; 'all': --precision
    compile: bool = False               # torch.compile the U-Net (forward and backward); not a setting of the result
    ls: float = 1.0
    bench: bool = True
    status: int = 128 << 10
    snapshot: int = 8 << 20             # 0 = only at the end
    checkpoint: int = 128 << 20         # 0 = only at the end (and on SIGINT / SIGTERM)
    seed: int = 0
    ema_stds: list = dataclasses.field(default_factory=lambda: [0.050, 0.100])
    device: str | None = None
    workers: int = 2
    snapshot_dtype: str = 'fp16'
    network: dict = dataclasses.field(default_factory=dict)  # overrides of configs/networks.toml [unet]
    # Watching the run (all off by default; see training.watching): sample grids, metrics, loggers.
    grid: int = 0                       # images between sample grids (0 = none)
    grid_seeds: list = dataclasses.field(default_factory=lambda: list(range(8)))
    grid_steps: int = 32
    grid_gnet: str | None = None        # guide of the autoguided rows: a snapshot file or a run folder
    grid_guidance: float = 2.0
    eval: int = 0                       # images between evaluations (0 = none); a multiple of --snapshot
    eval_ref: str | None = None
    eval_metrics: list = dataclasses.field(default_factory=lambda: ['fid'])
    eval_num: int = 5000
    eval_steps: int = 32
    eval_stds: list | None = None       # EMA lengths evaluated; default: the tracked ones
    eval_batch: int = 32
    inception_weights: str | None = None
    dinov2_weights: str | None = None
    logger: list = dataclasses.field(default_factory=list)  # 'tensorboard', 'wandb'
    wandb_project: str | None = None
    wandb_name: str | None = None
    wandb_group: str | None = None

    def __post_init__(self):
        for name in NIMG_RANGES:
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, parse_nimg(value))
                except ValueError as e:
                    raise TrainingError(f'{flag(name)}: {e}') from None
        for name in ('outdir', 'data'):
            _check(str(getattr(self, name)).strip(), f'{flag(name)}: expected a path, got an empty string')
        self.outdir = str(self.outdir)
        self.data = os.path.abspath(str(self.data))
        self.ema_stds = [float(s) for s in self.ema_stds]
        self.network = dict(self.network or {})
        self.grid_seeds = [int(v) for v in self.grid_seeds]
        self.eval_metrics = _names(self.eval_metrics)  # a list, or a string like 'fid,fd_dinov2'
        self.eval_stds = None if self.eval_stds is None else [float(s) for s in self.eval_stds]
        self.logger = _names(self.logger)
        if float(self.decay).is_integer():
            self.decay = int(self.decay)

    def check_numbers(self):
        """Every number finite and in its range (the command line checks the same ranges earlier)."""
        for name, bounds in FLOAT_RANGES.items():
            error = check_range(float(getattr(self, name)), *bounds)
            _check(error is None, f'{flag(name)}: {error}')
        ints = {name: getattr(self, name) for name in ('channels', 'workers', 'seed', 'grid_steps', 'eval_steps',
                                                       'eval_num', 'eval_batch')}
        ints.update({name: value for name, value in self.network.items() if name == 'num_blocks'})
        counts = {name: getattr(self, name) for name in NIMG_RANGES if getattr(self, name) is not None}
        for name, value in [*ints.items(), *counts.items()]:
            lo, hi = {**INT_RANGES, **NIMG_RANGES}[name]
            _check(isinstance(value, int) and lo <= value <= hi,
                   f'{flag(name)}: must be an integer in [{lo}, {hi}], got {value!r}')
        for name, key in (('channel_mult', 'channel_mult'), ('attn_res', 'attn_resolutions')):
            values = self.network.get(key, [])
            lo, hi = INT_RANGES[name]
            _check(all(isinstance(v, int) and lo <= v <= hi for v in values),
                   f'{flag(name)}: every value must be an integer in [{lo}, {hi}], got {values}')
        _check(len(self.network.get('channel_mult', [1])) in range(1, MAX_LEVELS + 1),
               f'--channel-mult: needs 1 to {MAX_LEVELS} levels, got {self.network.get("channel_mult")}')
        _check(self.precision in ('fp32', 'fp16', 'bf16'), '--precision must be fp32, fp16 or bf16')
        _check(self.precision_scope in ('cuda', 'all'), "precision_scope must be 'cuda' or 'all'")
        _check(self.snapshot_dtype in ('fp16', 'fp32'), '--snapshot-dtype must be fp16 or fp32')
        self._check_ema_stds()
        self._check_watching()

    def _check_watching(self):
        """The flags of grids, metrics and loggers (training.watching), before any work."""
        _check(0 < len(self.grid_seeds) <= MAX_GRID_SEEDS and all(s >= 0 for s in self.grid_seeds),
               f'--grid-seeds: needs 1 to {MAX_GRID_SEEDS} non-negative seeds, got {len(self.grid_seeds)}')
        for name in ('grid', 'eval'):  # grid file names and logger steps count thousands of images
            value = getattr(self, name)
            _check(value == 0 or value >= 1000, f'{flag(name)} {value}: must be 0 (off) or at least 1000 images '
                   f'(grids and logged steps are named by thousands of images)')
        _check(self.grid_gnet is None or os.path.exists(self.grid_gnet),
               f'--grid-gnet {self.grid_gnet}: no such file or folder')
        for name in self.logger:
            _check(name in LOGGERS, f'--logger {name}: choose from {", ".join(LOGGERS)}')
        if not self.eval:
            return
        _check(self.eval_ref is not None, '--eval needs --eval-ref (reference statistics, see calculate_metrics.py ref)')
        _check(self.snapshot > 0 and self.eval % self.snapshot == 0,
               f'--eval {self.eval}: must be a multiple of --snapshot {self.snapshot} (the networks evaluated are '
               f'the snapshots of that time, and lengths not tracked are reconstructed from them)')
        for std in self.eval_stds or []:
            try:
                std_to_exp(std)
            except ValueError as e:
                raise TrainingError(f'--eval-stds: {e}') from None
        _check(self.eval_stds is None or len(self.eval_stds) > 0, '--eval-stds needs at least one value')
    def _check_ema_stds(self):
        _check(len(self.ema_stds) > 0, '--ema-stds needs at least one value')
        for std in self.ema_stds:
            try:
                std_to_exp(std)
            except ValueError as e:
                raise TrainingError(f'--ema-stds: {e}') from None
        names = [f'{std:.3f}' for std in self.ema_stds]  # the snapshot file names
        _check(len(set(names)) == len(names),
               f'--ema-stds {",".join(map(str, self.ema_stds))}: two lengths share a snapshot name '
               f'(network-snapshot-*-{{sigma_rel:.3f}}); give distinct values at 0.001 resolution')


def snapshot_times(batch, duration, interval, after=0):
    """Image counts at which snapshots are written in (after, end]: the first step end (a multiple of
    `batch`) at or beyond each multiple of `interval`, and the end of training (the first multiple of
    `batch` at or beyond `duration`). `after` must be a multiple of `batch`."""
    end = -(-duration // batch) * batch
    times = np.array([end], np.int64)
    if interval > 0:
        first, last = after // interval + 1, end // interval
        _check(last - first < MAX_SNAPSHOTS, f'--snapshot {interval}: the run would write more than '
               f'{MAX_SNAPSHOTS:,} snapshots of each EMA length')
        k = np.arange(first, last + 1, dtype=np.int64)
        times = np.concatenate([-(-k * interval // batch) * batch, times])
    return np.unique(times[times > after])


def check_snapshot_names(opts, after=0, earlier=()):
    """Refuse runs in which two snapshots written at different times would get the same file name
    network-snapshot-{kimg:07d}-*, kimg = images // 1000 (the published naming), so that one would
    overwrite the other. `earlier`: image counts of snapshots already written by this run."""
    times = np.union1d(snapshot_times(opts.batch, opts.duration, opts.snapshot, after),
                       np.asarray(list(earlier), np.int64))
    kimg = times // 1000
    same = np.flatnonzero(kimg[1:] == kimg[:-1])
    if same.size:
        a, b = int(times[same[0]]), int(times[same[0] + 1])
        raise TrainingError(
            f'--snapshot {opts.snapshot} with --duration {opts.duration} and --batch {opts.batch}: the snapshots '
            f'at {a} and {b} images would share the name network-snapshot-{a // 1000:07d}-* (named by thousands '
            f'of images); choose --snapshot and --duration so that snapshot times fall in different thousands')


# ----------------------------------------------------------------------------------------------
# Everything checked before any output: numbers, the dataset, the network.

@dataclasses.dataclass
class Prepared:
    """What `prepare` found: the open dataset, the network's constructor arguments, the split of the batch."""
    dataset: ImageFolderDataset
    net_kwargs: dict
    batch_gpu: int
    rounds: int       # gradient-accumulation rounds per optimiser step
    num_params: int


def prepare(opts, world_size=1):
    """Check every option, open the dataset, resolve and size-check the network (nothing is written)."""
    opts.check_numbers()
    check_outdir(opts.outdir)
    batch_gpu = opts.batch_gpu or opts.batch // world_size
    _check(batch_gpu >= 1 and opts.batch % (world_size * batch_gpu) == 0,
           f'--batch={opts.batch} is not divisible by {world_size} process(es) x --batch-gpu={batch_gpu}')
    check_snapshot_names(opts)
    dataset = open_dataset(opts)
    try:
        net_kwargs = network_kwargs(opts, dataset)
        num_params = check_network_size(net_kwargs)
        check_memory(opts, dataset, net_kwargs, num_params, batch_gpu)
    except BaseException:
        dataset.close()
        raise
    return Prepared(dataset, net_kwargs, batch_gpu, opts.batch // (world_size * batch_gpu), num_params)


def check_memory(opts, dataset, net_kwargs, num_params, batch_gpu):
    """Refuse, before training, a network or a per-process batch that cannot fit in the memory available
    now (lower estimates): float32 weights, gradients, two Adam moments and each tracked EMA; per image of a
    pass, the image and the noise/denoised/loss copies (x 4) plus the U-Net's first level (model_channels at
    full resolution, four live activations), all float32."""
    error = memory_error(num_params, 4 * (4 + len(opts.ema_stds)), 'parameter', linear=False)
    _check(error is None, f'--channels/--channel-mult/--num-blocks: {error}')
    pixels = dataset.resolution ** 2
    image = 4 * pixels * (4 * dataset.num_channels + 4 * net_kwargs['model_channels'])
    error = memory_error(batch_gpu, image, 'image')
    _check(error is None, f'{"--batch-gpu" if opts.batch_gpu else "--batch"}: {error}')


def check_outdir(outdir):
    """--outdir must be a writable folder, or creatable: its nearest existing ancestor a writable folder."""
    problem = path_problem(outdir)
    _check(problem is None, f'--outdir {outdir}: {problem}')
    _check(not os.path.exists(outdir) or os.path.isdir(outdir), f'--outdir {outdir} exists and is not a folder')
    existing = os.path.abspath(outdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _check(os.path.isdir(existing), f'--outdir {outdir}: {existing} is a file, not a folder')
    _check(os.access(existing, os.W_OK | os.X_OK), f'--outdir {outdir}: {existing} is not writable')


def open_dataset(opts):
    """The training dataset, checked to suit the U-Net (square power-of-two images, 1/3 channels or
    8-channel VAE latents, labels when --cond)."""
    try:
        dataset = ImageFolderDataset(opts.data)
        if opts.cond:
            _check(dataset.has_labels, f'--data {opts.data} has no class labels (dataset.json "labels"), '
                   f'but --cond=1 (the default) needs them; train unconditionally with --cond=0')
            dataset = ImageFolderDataset(opts.data, use_labels=True)
    except DatasetError as e:
        raise TrainingError(f'--data: {e}') from None
    res = dataset.resolution
    if not (res >= 4 and res & (res - 1) == 0):
        problem = f'images are {res}x{res}; the U-Net needs a power-of-two resolution of at least 4'
    elif dataset.is_latent and dataset.num_channels != 8:
        problem = (f'latent arrays have {dataset.num_channels} channels; expected 8 (Stability VAE mean '
                   f'and std, see dataset_tool.py encode)')
    elif not dataset.is_latent and dataset.num_channels not in (1, 3):
        problem = f'images have {dataset.num_channels} channels; expected 1 or 3'
    elif opts.cond and dataset.label_dim == 0:
        problem = '--cond needs class labels in dataset.json'
    else:
        return dataset
    dataset.close()
    raise TrainingError(f'--data: {problem}')


def network_kwargs(opts, dataset):
    """Constructor arguments of the network: the dataset's shape, configs/networks.toml [unet], then
    --channels, --dropout and the architecture flags."""
    try:
        unet = dict(presets.load('networks').get('unet', {}))
    except presets.PresetError as e:
        raise TrainingError(str(e)) from None
    kwargs = dict(img_resolution=dataset.resolution, img_channels=4 if dataset.is_latent else dataset.num_channels,
                  label_dim=dataset.label_dim, use_fp16=opts.precision != 'fp32')
    kwargs.update(unet)
    kwargs.update(model_channels=opts.channels, dropout=opts.dropout)
    kwargs.update(opts.network)
    levels = len(kwargs.get('channel_mult', [1]))
    res = dataset.resolution
    _check(res >> (levels - 1) >= 1, f'--data: {res}x{res} images are too small for {levels} U-Net levels')
    return kwargs


def check_network_size(net_kwargs):
    """Parameter count of the network, refused above MAX_PARAMS before any memory is spent on it
    (edm2.network_config counts on torch's 'meta' device: exact, and no storage is allocated)."""
    try:
        num_params = check_network_kwargs(net_kwargs, max_params=None)
    except NetworkConfigError as e:
        raise TrainingError(f'network flags: {e}') from None
    _check(num_params <= MAX_PARAMS, f'--channels {net_kwargs["model_channels"]} with --channel-mult '
           f'{",".join(map(str, net_kwargs.get("channel_mult", [])))}: the network would have {num_params:,} '
           f'parameters (limit {MAX_PARAMS:,})')
    return num_params


# ----------------------------------------------------------------------------------------------
# The resolved settings that determine the result (recorded; a resumed run must reproduce them).
# Everything else (duration, intervals, --batch-gpu, --workers, --device, --bench, --snapshot-dtype)
# may change between sessions of the same run.

SETTING_KEYS = ('data', 'cond', 'batch', 'lr', 'decay', 'rampup', 'P_mean', 'P_std', 'dropout', 'channels',
                'precision', 'precision_scope', 'ls', 'seed', 'ema_stds', 'network_kwargs')
# Settings added after runs were recorded without them: a record that lacks one had this value.
SETTING_DEFAULTS = {'precision_scope': 'cuda'}


def settings(opts, net_kwargs):
    """JSON-normalised record of the result-determining settings, with the network fully resolved
    (so an explicit default such as --channel-mult 1,2,3,4 equals an omitted one)."""
    record = {k: getattr(opts, k) for k in SETTING_KEYS if k != 'network_kwargs'}
    record['network_kwargs'] = net_kwargs
    return json.loads(json.dumps(record))


def compare_settings(old, new):
    """'name: old -> new' for each differing setting, joined by '; ' ('' when they agree)."""
    diffs = []
    for key in SETTING_KEYS:
        if key == 'network_kwargs' and key not in old:
            # Recorded before the network was stored resolved: compare its overrides only.
            changed = {k: v for k, v in (old.get('network') or {}).items() if new[key].get(k) != v}
            diffs += [f'network.{k}: {v!r} -> {new[key].get(k)!r}' for k, v in changed.items()]
        elif key == 'network_kwargs' and old[key] != new[key]:
            diffs += [f'network.{k}: {old[key].get(k)!r} -> {new[key].get(k)!r}'
                      for k in sorted(set(old[key]) | set(new[key])) if old[key].get(k) != new[key].get(k)]
        elif key != 'network_kwargs' and old.get(key, SETTING_DEFAULTS.get(key)) != new.get(key):
            diffs.append(f'{key}: {old.get(key, SETTING_DEFAULTS.get(key))!r} -> {new.get(key)!r}')
    return '; '.join(diffs)
