"""Autoguidance sweep: evaluate metrics over (main EMA length, guide EMA length, guidance weight w).

The networks are post-hoc EMA reconstructions (EDM2 paper sec. 3.3) built in memory from a folder of
snapshots, a batch of EMA lengths per pass over the snapshots, and kept while the cells that need them
are evaluated (order: edm2.metrics.sweep_plan). Every cell samples the same seeds, so differences
between cells are not seed noise (autoguidance paper sec. 5 tunes these knobs the same way).

    SweepConfig(net, gnet, ...)     the axes (edm2.metrics.sweep_source) and fixed settings of a sweep
    run_sweep(config, ...)          evaluate the cells, append each to cells.jsonl, resume from it

Memory bound: at most `phema_batch` main networks and `guide_batch` guides are held, plus one input
snapshot (one tensor for native files) while a batch is being reconstructed.
"""

import os
import time

import torch

from edm2 import distributed, generation, phema_reconstruct, sampling
from edm2.checkpoint import load_snapshot
from edm2.errors import one_line

from . import evaluate, sweep_plan
from .sweep_log import CellLog, SweepError, cell_key, check_resume, write_settings

# ----------------------------------------------------------------------------------------------------
# Adapters: the only calls into post-hoc EMA reconstruction (planning it: sweep_source), the sampler
# and the detectors.


def reconstruct_phema(snapshots, stds, kimg, device, loader=None):
    """Reconstruct the EMA lengths `stds` at `kimg` in one pass over the snapshots (each read once):
    [(net, encoder, metadata, [(snapshot, weight), ...]), ...] in the order of `stds`."""
    recs = []
    for batch in phema_reconstruct.reconstruct_batches(snapshots, stds, kimg, batch=len(stds), device=device,
                                                       loader=loader):
        recs += [(r.net, r.encoder, r.metadata, r.coefficients) for r in batch]
    return recs


def load_network_file(path, device):
    """(net, encoder) of a fixed network file, in eval mode."""
    net, encoder, _ = load_snapshot(path, device=device)
    return net.eval().requires_grad_(False), encoder


def check_pair(net, gnet):
    """Raise if `gnet` cannot guide `net` (resolution, channels, labels)."""
    sampling.check_guide(net, gnet)


def guidance_interval(config):
    """The sampler's interval (sampling.SigmaInterval / StepInterval) of the sweep, or None."""
    if config.guidance_interval is not None:
        return sampling.SigmaInterval(*config.guidance_interval)
    if config.guidance_interval_steps is not None:
        return sampling.StepInterval(*config.guidance_interval_steps)
    return None


def sample_images(net, encoder, gnet, guidance, seeds, config, device):
    """This rank's batches (uint8 images, positions into `seeds`) of the guided sampler, as `gen` draws them
    (w = 1 never evaluates the guide)."""
    guides = sampling.Guidance(guides=(gnet,), weight=guidance, interval=guidance_interval(config))
    stream = generation.generate(net, seeds, guidance=guides, sigmas=sampling.edm_schedule(config.steps),
                                 encoder=encoder, batch_size=config.batch, device=device)
    return ((b.images, torch.as_tensor(list(b.positions))) for b in stream)


def feature_stats(batches, detectors, num, keep, device):
    """{detector: FeatureStats} of the image batches, reduced over ranks."""
    return evaluate.accumulate(batches, detectors, num, keep=keep, device=device)


def metric_values(stats, reference, metrics, pr_features, seed, device):
    return evaluate.compute_metrics(stats, reference, metrics, pr_detector=pr_features, seed=seed, device=device)


class SweepConfig:
    """Everything that defines a sweep. Axes: `net`, `gnet` (Source) and `guidances` (list of w)."""

    def __init__(self, net, gnet, guidances, metrics, num, seed=0, steps=32, guidance_interval=None,
                 guidance_interval_steps=None, batch=64, phema_batch=8, guide_batch=None, search='grid',
                 pr_features='dinov2', ref_name=None, extra_fixed=None):
        self.net, self.gnet, self.guidances = net, gnet, [float(w) for w in guidances]
        self.metrics, self.num, self.seed, self.steps = list(metrics), int(num), int(seed), int(steps)
        self.guidance_interval, self.guidance_interval_steps = guidance_interval, guidance_interval_steps
        self.batch, self.phema_batch = int(batch), max(int(phema_batch), 1)
        self.guide_batch = len(gnet.stds) if not guide_batch else int(guide_batch)
        self.search, self.pr_features, self.ref_name = search, pr_features, ref_name
        self.extra_fixed = dict(extra_fixed or {})
        if not self.guidances:
            raise SweepError('--guidance: expected at least one value')
        if search not in ('grid', 'descent'):
            raise SweepError(f'--search: expected grid or descent, got {search!r}')

    @property
    def shape(self):
        return len(self.net.stds), len(self.gnet.stds), len(self.guidances)

    def fixed_settings(self):
        """Settings that change the value of a cell, keyed by the flag that sets them (checked on resume)."""
        return dict({'--net-dir/--net': self.net.describe(), '--gnet-dir/--gnet': self.gnet.describe(),
                     '--ref': self.ref_name, '--metrics': self.metrics, '--num': self.num, '--seed': self.seed,
                     '--steps': self.steps,
                     '--guidance-interval': None if self.guidance_interval is None else list(self.guidance_interval),
                     '--guidance-interval-steps': None if self.guidance_interval_steps is None
                     else list(self.guidance_interval_steps)}, **self.extra_fixed)

    def memory_bound(self):
        """(main networks, guide networks) held at most; plus one input snapshot while reconstructing."""
        main = 1 if self.net.fixed else min(self.phema_batch, len(self.net.stds))
        guide = 1 if self.gnet.fixed else min(self.guide_batch, len(self.gnet.stds))
        return main, guide

    def planned_reconstructions(self):
        """(main, guide) reconstructions of a full grid in the grid order (0 for a fixed network)."""
        m, g = sweep_plan.count_reconstructions(len(self.net.stds), len(self.gnet.stds), *self.memory_bound())
        return (0 if self.net.fixed else m), (0 if self.gnet.fixed else g)


# ----------------------------------------------------------------------------------------------------
# Networks held in memory.

class NetworkPool:
    """The networks of one axis that are held, at most `capacity`; missing ones are reconstructed
    together in one pass over the snapshots, evicting the least recently used first."""

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
        if self.source.fixed:
            self.held[0] = load_network_file(self.source.path, self.device)
            self.counter['loads'] = self.counter.get('loads', 0) + 1
        else:
            stds = [self.source.stds[i] for i in missing]
            recs = reconstruct_phema(self.source.snapshots, stds, self.source.kimg, self.device, self.loader)
            for i, (net, encoder, _, _) in zip(missing, recs):
                self.held[i] = (net, encoder)
            self.counter['reconstructions'] = self.counter.get('reconstructions', 0) + len(missing)
            self.counter['batches'] = self.counter.get('batches', 0) + 1
        self.seconds += time.perf_counter() - t0

    def get(self, index):
        return self.held[index]

    def clear(self):
        self.held.clear()


def preflight(config, device):
    """Checks made before any cell: the guidance interval, and that the guide fits the main network
    (reads one snapshot of each axis)."""
    try:
        interval = guidance_interval(config)
        if interval is not None:
            interval.select(sampling.edm_schedule(config.steps))
    except sampling.SamplingError as e:
        flag = '--guidance-interval' if config.guidance_interval is not None else '--guidance-interval-steps'
        raise SweepError(f'{flag}: {one_line(e)}') from None
    def first(source):
        if source.fixed:
            return load_network_file(source.path, device)[0]
        return load_network_file(source.inputs[0].source, device)[0]
    try:
        net, gnet = first(config.net), first(config.gnet)
    except ValueError as e:  # CheckpointError, PhemaError: one line naming the file
        raise SweepError(one_line(e)) from None
    try:
        check_pair(net, gnet)
    except ValueError as e:  # SamplingError
        raise SweepError(f'{config.gnet.flag}: {str(e).strip()}') from None


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
        i, j, k = cell
        c = self.config
        return cell_key(c.net.stds[i], c.gnet.stds[j], c.guidances[k])

    def done(self, cell):
        return self.key(cell) in self.log.cells

    def __call__(self, cell):
        if self.done(cell):
            return self.log.cells[self.key(cell)]
        i, j, k = cell
        c = self.config
        self.pools[0].ensure([i])
        self.pools[1].ensure([j])
        (net, encoder), (gnet, _) = self.pools[0].get(i), self.pools[1].get(j)
        t0 = time.perf_counter()
        info = dict(net_std=c.net.stds[i], gnet_std=c.gnet.stds[j], guidance=c.guidances[k])
        if self.cell_metrics is not None:
            values, seconds = dict(self.cell_metrics(info, net, gnet)), {}
        else:
            values, seconds = self._measure(net, encoder, gnet, c.guidances[k])
        values = _share(values, c.metrics, self.device)
        seconds['total'] = time.perf_counter() - t0
        record = dict(info, **{m: values[m] for m in c.metrics}, seconds=seconds,
                      net=c.net.provenance(i), gnet=c.gnet.provenance(j))
        self.log.append(record)
        self.evaluated += 1
        if self.bar is not None:
            self.bar.update(1)
        return record

    def _measure(self, net, encoder, gnet, guidance):
        c = self.config
        seeds = list(range(c.seed, c.seed + c.num))
        times = {'sampling': 0.0, 'features': 0.0}
        keep = {c.pr_features} if any(m in evaluate.PR_METRICS for m in c.metrics) else set()
        try:
            batches = sample_images(net, encoder, gnet, guidance, seeds, c, self.device)
        except sampling.SamplingError as e:
            raise SweepError(str(e)) from None
        t0 = time.perf_counter()
        stats = feature_stats(_timed(batches, times, 'sampling'), self.detectors, c.num, keep, self.device)
        t1 = time.perf_counter()
        times['features'] = t1 - t0 - times['sampling']
        values = {}
        if distributed.is_main():
            values = metric_values(stats, self.reference, c.metrics, c.pr_features, c.seed, self.device)
        times['metrics'] = time.perf_counter() - t1  # Fréchet distances: a matrix square root per metric
        return values, times


def _run_grid(config, cells):
    chunks, _ = sweep_plan.grid_chunks(*config.shape[:2], *config.memory_bound())
    for main_idx, guide_idx in chunks:
        todo = [(i, j, k) for i in main_idx for j in guide_idx for k in range(config.shape[2])
                if not cells.done((i, j, k))]
        if not todo:
            continue  # finished in an earlier run: not even reconstructed
        cells.pools[0].ensure(sorted({i for i, _, _ in todo}))
        cells.pools[1].ensure(sorted({j for _, j, _ in todo}))
        for cell in todo:
            cells(cell)


def _run_descent(config, cells):
    metric = config.metrics[0]
    best, _, values = sweep_plan.coordinate_descent(
        config.shape, lambda cell: sweep_plan.score(metric, cells(cell)[metric]))
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
    log = CellLog(os.path.join(outdir, 'cells.jsonl'))
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
    records = [log.cells[cells.key(c)] for c in _all_cells(config.shape) if cells.done(c)]
    return dict(cells=records, counter=counter, evaluated=cells.evaluated, descent=descent,
                seconds=dict(total=time.perf_counter() - t0, reconstruction=sum(p.seconds for p in pools)))


def _all_cells(shape):
    return [(i, j, k) for i in range(shape[0]) for j in range(shape[1]) for k in range(shape[2])]


def best_networks(config, record, device, loader=None):
    """((net, encoder), (gnet, encoder)) of a cell's EMA lengths, reconstructed afresh (for --save-best)."""
    out = []
    for source, std in ((config.net, record['net_std']), (config.gnet, record['gnet_std'])):
        index = 0 if source.fixed else min(range(len(source.stds)), key=lambda n: abs(source.stds[n] - std))
        pool = NetworkPool(source, 1, device, loader)
        pool.ensure([index])
        out.append(pool.get(index))
    return out
