"""Autoguidance sweep: evaluate metrics over (main EMA length, guide EMA length, guidance weight w, guidance
rule, guidance interval); the last two axes are edm2.sweep.axes.

The networks are post-hoc EMA reconstructions (EDM2 paper sec. 3.3) built in memory from a folder of
snapshots, a batch of EMA lengths per pass over the snapshots, and kept while the cells that need them
are evaluated (order: edm2.sweep.plan). Every cell samples the same seeds, so differences
between cells are not seed noise (autoguidance paper sec. 5 tunes these knobs the same way).

    SweepConfig(net, gnet, ...)     the axes (edm2.sweep.source) and fixed settings of a sweep
    run_sweep(config, ...)          evaluate the cells, append each to cells.jsonl, resume from it

Memory bound: at most `phema_batch` main networks and `guide_batch` guides are held, plus one input
snapshot (one tensor for native files) while a batch is being reconstructed.
"""

import itertools
import os
import time

import torch

from edm2 import distributed, generation, limits, sampling
from edm2.errors import one_line
from edm2.guidance_rules import RuleError, parse_rule

from edm2.metrics import evaluate

from . import axes as sweep_axes
from . import plan as sweep_plan
from .log import CellLog, SweepError, cell_key, check_resume, write_settings

# ----------------------------------------------------------------------------------------------------
# Adapters: the only calls into the sampler and the detectors (building the networks: source.py).


def guidance_intervals(guidance_interval=None, guidance_interval_steps=None):
    """The interval axis from the flags' values (each None, one pair or a list of pairs): sampling.SigmaInterval
    and StepInterval objects, or [None] (every step guided) when neither is given."""
    def pairs(value):
        return [] if value is None else [value] if value and not isinstance(value[0], (tuple, list)) else list(value)
    intervals = [sampling.SigmaInterval(*v) for v in pairs(guidance_interval)]
    intervals += [sampling.StepInterval(*v) for v in pairs(guidance_interval_steps)]
    return list(dict.fromkeys(intervals)) or [None]


def sample_images(net, encoder, gnet, guidance, seeds, config, device, rule=None, interval=None):
    """This rank's batches (uint8 images, positions into `seeds`) of the guided sampler, as `gen` draws them
    (w = 1 never evaluates the guide)."""
    guides = sampling.Guidance(guides=(gnet,), weight=guidance, interval=interval,
                               rule=parse_rule('lerp' if rule is None else rule))
    stream = generation.generate(net, seeds, guidance=guides, sigmas=sampling.edm_schedule(config.steps),
                                 encoder=encoder, batch_size=config.batch, device=device)
    return ((b.images, torch.as_tensor(list(b.positions))) for b in stream)


def feature_stats(batches, detectors, num, keep, device):
    """{detector: FeatureStats} of the image batches, reduced over ranks."""
    return evaluate.accumulate(batches, detectors, num, keep=keep, device=device)


def metric_values(stats, reference, metrics, pr_features, seed, device):
    return evaluate.compute_metrics(stats, reference, metrics, pr_detector=pr_features, seed=seed, device=device)


class SweepConfig:
    """Everything that defines a sweep. Axes: `net`, `gnet` (Source), `guidances` (list of w), `rules`
    (guidance rules or their specs; default lerp) and the guidance intervals (`guidance_interval`: one
    (lo, hi] pair or a list of them; `guidance_interval_steps` likewise; none = every step guided)."""

    def __init__(self, net, gnet, guidances, metrics, num, seed=0, steps=32, guidance_interval=None,
                 guidance_interval_steps=None, batch=64, phema_batch=8, guide_batch=None, search='grid',
                 pr_features='dinov2', ref_name=None, extra_fixed=None, rules=('lerp',)):
        self.net, self.gnet, self.guidances = net, gnet, [float(w) for w in guidances]
        self.metrics, self.num, self.seed, self.steps = list(metrics), int(num), int(seed), int(steps)
        try:
            self.rules = list(dict.fromkeys(parse_rule(r) for r in rules))
            self.intervals = guidance_intervals(guidance_interval, guidance_interval_steps)
        except (RuleError, sampling.SamplingError) as e:
            raise SweepError(one_line(e)) from None
        self.cell_defaults = {'rule': 'lerp', 'interval': None}  # run_sweep reads them from the folder
        self.batch, self.phema_batch = int(batch), max(int(phema_batch), 1)
        self.guide_batch = len(gnet.stds) if not guide_batch else int(guide_batch)
        self.search, self.pr_features, self.ref_name = search, pr_features, ref_name
        self.extra_fixed = dict(extra_fixed or {})
        if not self.guidances:
            raise SweepError('--guidance: expected at least one value')
        if not self.rules:
            raise SweepError('--guidance-rule: expected at least one rule')
        if search not in ('grid', 'descent'):
            raise SweepError(f'--search: expected grid or descent, got {search!r}')

    @property
    def shape(self):
        """Axis sizes: (main EMA lengths, guide EMA lengths, w, rules, intervals)."""
        return len(self.net.stds), len(self.gnet.stds), len(self.guidances), len(self.rules), len(self.intervals)

    def fixed_settings(self):
        """Settings that change the value of a cell, keyed by the flag that sets them (checked on resume).
        The rule and the interval are not among them: every cell records its own (edm2.sweep.axes)."""
        return dict({'--net-dir/--net': self.net.describe(), '--gnet-dir/--gnet': self.gnet.describe(),
                     '--ref': self.ref_name, '--metrics': self.metrics, '--num': self.num, '--seed': self.seed,
                     '--steps': self.steps}, **self.extra_fixed)

    def memory_bound(self):
        """(main networks, guide networks) held at most; plus one input snapshot while reconstructing. A
        self guide holds nothing of its own (it is the main network, perturbed while it runs)."""
        return self.net.held(self.phema_batch), self.gnet.held(self.guide_batch)

    def planned_reconstructions(self):
        """(main, guide) reconstructions of a full grid in the grid order (0 for a fixed network or a self guide)."""
        main_cap, guide_cap = self.memory_bound()
        m, g = sweep_plan.count_reconstructions(len(self.net.stds), len(self.gnet.stds), main_cap, max(guide_cap, 1))
        return self.net.planned(m), self.gnet.planned(g)

    def key(self, cell):
        """The cell_key of the cell at index tuple `cell`."""
        i, j, k, r, v = cell
        return cell_key(self.net.stds[i], self.gnet.stds[j], self.guidances[k], str(self.rules[r]),
                        sweep_axes.interval_spec(self.intervals[v]))


# ----------------------------------------------------------------------------------------------------
# Networks held in memory.

class NetworkPool:
    """The networks of one axis that are held, at most `capacity`; missing ones are built together (for
    snapshots: one pass over them), evicting the least recently used first."""

    def __init__(self, source, capacity, device, loader=None, counter=None):
        self.source, self.capacity, self.device, self.loader = source, max(int(capacity), 1), device, loader
        self.held = {}  # axis index -> (net, encoder); insertion order = recency
        self.counter = counter if counter is not None else {}
        self.seconds = 0.0

    def ensure(self, indices):
        indices = list(dict.fromkeys(indices))
        for i in indices:
            if i in self.held:
                self.held[i] = self.held.pop(i)  # most recently used
        missing = [i for i in indices if i not in self.held]
        if not missing:
            return
        for i in list(self.held):
            if len(self.held) + len(missing) <= self.capacity:
                break
            if i not in indices:
                del self.held[i]
        t0 = time.perf_counter()
        self.held.update(zip(missing, self.source.build(missing, self.device, self.loader, self.counter)))
        self.seconds += time.perf_counter() - t0

    def get(self, index):
        return self.held[index]

    def clear(self):
        self.held.clear()


def check_memory(config, net, gnet, device):
    """Refuse, before any cell, a sweep whose networks held at once (`memory_bound`, plus one input
    snapshot while reconstructing; float32, a lower estimate) do not fit in the available memory, naming
    --phema-batch or --gnet-batch, whichever holds more."""
    main_cap, guide_cap = config.memory_bound()
    main, guides = config.net.memory(main_cap, net), config.gnet.memory(guide_cap, gnet)
    free = limits.available_memory(device)
    if main + guides > free:
        flag, value = ('--phema-batch', config.phema_batch) if main >= guides else ('--gnet-batch', config.guide_batch)
        raise SweepError(f'{flag} {value}: {main_cap} main and {guide_cap} guide networks held at once need about '
                         f'{limits.format_bytes(main + guides)} of memory, but {limits.format_bytes(free)} is available; '
                         f'lower {flag}')


def preflight(config, device):
    """Checks made before any cell: the guidance intervals, and that the guide fits the main network
    (reads one snapshot of each axis; a self guide's blocks are looked up in the main network)."""
    for interval in config.intervals:
        try:
            if interval is not None:
                interval.select(sampling.edm_schedule(config.steps))
        except sampling.SamplingError as e:
            flag = '--guidance-interval' if isinstance(interval, sampling.SigmaInterval) else \
                '--guidance-interval-steps'
            raise SweepError(f'{flag}: {one_line(e)}') from None
    try:
        net, gnet = config.net.first_network(device), config.gnet.first_network(device)
    except ValueError as e:  # CheckpointError, PhemaError: one line naming the file
        raise SweepError(one_line(e)) from None
    check_memory(config, net, gnet, device)
    config.gnet.check_guide(net, gnet)


# ----------------------------------------------------------------------------------------------------
# Evaluating cells.

def _timed(iterator, times, key):
    """Yield from `iterator`, adding the seconds spent inside next() to times[key]."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            times[key] += time.perf_counter() - t0
            return
        times[key] += time.perf_counter() - t0
        yield item


def _share(values, metrics, device):
    """Rank 0's metric values on every rank (the search decides on the same numbers everywhere)."""
    if distributed.get_world_size() == 1:
        return values
    t = torch.tensor([float(values[m]) if distributed.is_main() else 0.0 for m in metrics], dtype=torch.float64,
                     device=device)
    distributed.all_reduce_sum(t)
    return {m: float(v) for m, v in zip(metrics, t.tolist())}


class _Cells:
    """Evaluates cells (or returns finished ones from the log), appending each new one to the log."""

    def __init__(self, config, log, pools, detectors, reference, device, cell_metrics, bar):
        self.config, self.log, self.pools, self.device = config, log, pools, device
        self.detectors, self.reference, self.cell_metrics, self.bar = detectors, reference, cell_metrics, bar
        self.evaluated = 0

    def key(self, cell):
        return self.config.key(cell)

    def done(self, cell):
        return self.key(cell) in self.log.cells

    def __call__(self, cell):
        if self.done(cell):
            return self.log.cells[self.key(cell)]
        i, j, k, r, v = cell
        c = self.config
        self.pools[0].ensure([i])
        self.pools[1].ensure([j])
        (net, encoder), (gnet, _) = self.pools[0].get(i), self.pools[1].get(j)
        gnet = c.gnet.for_cell(gnet, net)  # a self guide: the main network, perturbed
        t0 = time.perf_counter()
        info = dict(net_std=c.net.stds[i], gnet_std=c.gnet.stds[j], guidance=c.guidances[k], rule=str(c.rules[r]),
                    interval=sweep_axes.interval_spec(c.intervals[v]))
        if self.cell_metrics is not None:
            values, seconds = dict(self.cell_metrics(info, net, gnet)), {}
        else:
            values, seconds = self._measure(net, encoder, gnet, c.guidances[k], c.rules[r], c.intervals[v])
        values = _share(values, c.metrics, self.device)
        seconds['total'] = time.perf_counter() - t0
        record = dict(info, **{m: values[m] for m in c.metrics}, seconds=seconds,
                      net=c.net.provenance(i), gnet=c.gnet.provenance(j))
        self.log.append(record)
        self.evaluated += 1
        if self.bar is not None:
            self.bar.update(1)
        return record

    def _measure(self, net, encoder, gnet, guidance, rule, interval):
        c = self.config
        seeds = list(range(c.seed, c.seed + c.num))
        times = {'sampling': 0.0, 'features': 0.0}
        keep = {c.pr_features} if any(m in evaluate.PR_METRICS for m in c.metrics) else set()
        try:
            batches = sample_images(net, encoder, gnet, guidance, seeds, c, self.device, rule, interval)
        except sampling.SamplingError as e:
            raise SweepError(str(e)) from None
        t0 = time.perf_counter()
        stats = feature_stats(_timed(batches, times, 'sampling'), self.detectors, c.num, keep, self.device)
        t1 = time.perf_counter()
        times['features'] = t1 - t0 - times['sampling']
        values = {}
        if distributed.is_main():
            values = metric_values(stats, self.reference, c.metrics, c.pr_features, c.seed, self.device)
        times['metrics'] = time.perf_counter() - t1  # Fréchet distances (the reference's factor reused)
        return values, times


def _run_grid(config, cells):
    chunks, _ = sweep_plan.grid_chunks(*config.shape[:2], *config.memory_bound())
    for main_idx, guide_idx in chunks:
        todo = [(i, j) + rest for i in main_idx for j in guide_idx
                for rest in itertools.product(*map(range, config.shape[2:])) if not cells.done((i, j) + rest)]
        if not todo:
            continue  # finished in an earlier run: not even reconstructed
        cells.pools[0].ensure(sorted({cell[0] for cell in todo}))
        cells.pools[1].ensure(sorted({cell[1] for cell in todo}))
        for cell in todo:
            cells(cell)


def _run_descent(config, cells):
    metric = config.metrics[0]
    best, _, values = sweep_plan.coordinate_descent(
        config.shape, lambda cell: sweep_plan.score(metric, cells(cell)[metric]), categorical=(3, 4))
    return best, len(values)


def run_sweep(config, outdir, *, detectors=None, reference=None, device='cpu', cell_metrics=None, loader=None,
              progress=True):
    """Evaluate the sweep's cells into `outdir`/cells.jsonl (resuming from the cells already there).

    `cell_metrics(cell, net, gnet) -> {metric: value}` replaces sampling and feature extraction (tests,
    custom metrics); `loader(source, device)` replaces the snapshot reader of the reconstruction.
    Returns a dict: `cells` (the records of every cell of the search, grid order), `counter`
    (reconstructions, batches, loads this run), `evaluated` (cells computed this run), `descent`
    (the cell where the coordinate search stopped and how many cells it visited) and `seconds`.
    """
    from tqdm import tqdm

    check_resume(outdir, config)
    config.cell_defaults = sweep_axes.cell_defaults(outdir)
    log = CellLog(os.path.join(outdir, 'cells.jsonl'), config.cell_defaults)
    distributed.barrier()  # every rank has read the log before rank 0 touches it
    if distributed.is_main():
        os.makedirs(outdir, exist_ok=True)
        log.repair()
        write_settings(outdir, config)
    distributed.barrier()
    counter = {}
    main_cap, guide_cap = config.memory_bound()
    pools = (NetworkPool(config.net, main_cap, device, loader, counter),
             NetworkPool(config.gnet, guide_cap, device, loader, counter))
    total = sweep_plan.num_cells(config.shape) if config.search == 'grid' else None
    bar = tqdm(total=total, unit='cell', desc='Sweep', disable=not (progress and distributed.is_main()))
    cells = _Cells(config, log, pools, detectors, reference, device, cell_metrics, bar)
    if total is not None:
        finished = sum(cells.done(c) for c in _all_cells(config.shape))
        if finished and progress:
            distributed.print0(f'Resuming: {finished} of {total} cells already in {log.path}')
        bar.update(finished)
    t0 = time.perf_counter()
    descent = None
    try:
        if config.search == 'grid':
            _run_grid(config, cells)
        else:
            best, visited = _run_descent(config, cells)
            descent = dict(cell=cells.key(best), visited=visited)
    finally:
        bar.close()
        for pool in pools:
            pool.clear()
    # Records written before the rule and interval were axes get them filled in (cell_defaults).
    records = [dict(config.cell_defaults, **log.cells[cells.key(c)]) for c in _all_cells(config.shape)
               if cells.done(c)]
    return dict(cells=records, counter=counter, evaluated=cells.evaluated, descent=descent,
                seconds=dict(total=time.perf_counter() - t0, reconstruction=sum(p.seconds for p in pools)))


def _all_cells(shape):
    return list(itertools.product(*map(range, shape)))


def best_networks(config, record, device, loader=None):
    """((net, encoder), (gnet, encoder)) of a cell's EMA lengths, reconstructed afresh (for --save-best);
    (gnet, encoder) is None for a self guide (it is the main network)."""
    return [source.rebuild(record[key], device, loader) for source, key in ((config.net, 'net_std'),
                                                                             (config.gnet, 'gnet_std'))]
