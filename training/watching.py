"""Watching a run while it trains: the hooks the training loop calls for sample grids (`training.grids`),
metrics at several EMA lengths (`training.evaluation`) and experiment trackers (`training.loggers`).

All of it is off by default; the loop then holds no `Watch` and pays nothing. Grids are made on rank 0 (it
holds the EMA), evaluations on every rank (the images are split like `calculate_metrics.py gen`), loggers
on rank 0. The seconds spent here are reported as a share of the session's time, and left out of the
status line's sec/kimg.
"""

import os
import time

from edm2 import distributed as dist

from . import loss_buckets
from . import state as run_state
from .evaluation import Evaluator, metrics_path
from .grids import GridMaker
from .loggers import Loggers

STAT_SCALARS = ('loss', 'lr', 'grad_norm', 'sec_per_kimg', 'images_per_s', 'nonfinite', 'cpu_mem_gb', 'gpu_mem_gb')


def wanted(opts):
    return bool(opts.grid or opts.eval or opts.logger)


def crossed(interval, prev_nimg, cur_nimg):
    return interval > 0 and cur_nimg // interval > prev_nimg // interval


class Watch:
    """Grids, evaluations and loggers of one session; everything that can fail to start is opened here,
    before the first step."""

    def __init__(self, opts, config, resume_nimg, net, encoder, device, log):
        self.opts, self.log, self.main = opts, log, dist.is_main()
        self.seconds, self.started = 0.0, time.time()
        self.grids = GridMaker(opts, net, encoder, device) if opts.grid and self.main else None
        self.evaluator = Evaluator(opts, opts.ema_stds, device) if opts.eval else None
        if self.main:  # lines after the checkpoint (all of them on a fresh start) will be computed again
            run_state.truncate_stats(metrics_path(opts.outdir), resume_nimg)
        self.loggers = Loggers(opts, config, resume_nimg, log) if opts.logger and self.main else None

    def due(self, prev_nimg, cur_nimg):
        return crossed(self.opts.grid, prev_nimg, cur_nimg) or crossed(self.opts.eval, prev_nimg, cur_nimg)

    def at_start(self, nimg, ema):
        """The first grid of a fresh run, before its first step (a mistake in the data shows at once)."""
        if nimg == 0 and self.grids is not None:
            self._timed(lambda: self._grid(nimg, ema))

    def status(self, rec):
        """Log a stats.jsonl line."""
        if self.loggers is None:
            return
        values = {name: rec[name] for name in STAT_SCALARS}
        values.update({f'loss_sigma/{name}': v for name, v in zip(loss_buckets.bucket_names(), rec['loss_sigma'])})
        values['watch_share'] = self.share()
        self.loggers.scalars(values, rec['nimg'])

    def after_step(self, prev_nimg, cur_nimg, ema):
        """Grid and evaluation where their intervals were crossed (the snapshots of this time are written);
        returns the seconds spent."""
        spent = 0.0
        if self.grids is not None and crossed(self.opts.grid, prev_nimg, cur_nimg):
            spent += self._timed(lambda: self._grid(cur_nimg, ema))
        if self.evaluator is not None and crossed(self.opts.eval, prev_nimg, cur_nimg):
            dist.barrier()  # rank 0 has written the snapshots every rank reads
            spent += self._timed(lambda: self._evaluate(cur_nimg))
        if spent:
            self.log(f'Grids and metrics: {spent:.1f}s now, {100 * self.share():.1f}% of this session\'s time')
        return spent

    def share(self):
        return self.seconds / max(time.time() - self.started, 1e-9)

    def _timed(self, work):
        start = time.time()
        work()
        spent = time.time() - start
        self.seconds += spent
        return spent

    def _grid(self, nimg, ema):
        path, image = self.grids.write(self.opts.outdir, nimg, ema.get())
        rows = len(ema.get()) * (1 if self.grids.guidance is None else 2)
        self.log(f'Grid {os.path.basename(path)}: {rows} rows x {len(self.opts.grid_seeds)} seeds')
        if self.loggers is not None:
            self.loggers.image('grid', image, nimg)

    def _evaluate(self, nimg):
        lines = self.evaluator.run(self.opts.outdir, nimg)
        if not self.main:
            return
        self.log(f'Metrics at kimg {nimg / 1000:g}: ' + ', '.join(
            f'{line["metric"]} {line["value"]:.4g} (ema {line["ema_std"]:.3f}'
            f'{", reconstructed" if line["reconstructed"] else ""})' for line in lines))
        if self.loggers is not None:
            self.loggers.scalars({f'metrics/{line["metric"]}/ema_{line["ema_std"]:.3f}': line['value']
                                  for line in lines}, nimg)
            self.loggers.scalars({'watch_share': self.share()}, nimg)

    def close(self):
        if self.loggers is not None:
            self.loggers.close()
