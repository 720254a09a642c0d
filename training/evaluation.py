"""Metrics during training: FID, FD_DINOv2, precision and recall of the run's networks at several EMA
lengths, computed every `--eval` images and appended to metrics.jsonl.

At an evaluation time the run has just written its snapshots (`--eval` is a multiple of `--snapshot`):
a tracked length is evaluated from its snapshot file, any other length is reconstructed post hoc from
the snapshots written so far (EDM2 paper, Sec. 3.2; `edm2.phema_reconstruct`). The images and their
statistics are those of `calculate_metrics.py gen --net SNAPSHOT --num N --steps S` (seeds 0..N-1): the same
library calls (`edm2.metrics`), detectors, reference and cache, spread over the ranks in the same way.
Each line of metrics.jsonl: kimg, nimg, ema_std, metric, value, images, seconds, reconstructed.
"""

import os
import time

from edm2 import checkpoint, distributed, jsontext, sampling
from edm2.errors import EDM2Error, one_line
from edm2.fileio import open_append, reporting_full_disk
from edm2.metrics import evaluate, inputs, network_features, report
from edm2.phema_reconstruct import find_snapshots, reconstruct

from .options import TrainingError

SNAPSHOT_PREFIX = 'network-snapshot'
PR_FEATURES = 'dinov2'


def metrics_path(outdir):
    return os.path.join(outdir, 'metrics.jsonl')


class Evaluator:
    """The detectors and reference of a run's evaluations, loaded before its first step."""

    def __init__(self, opts, tracked_stds, device):
        self.opts, self.device = opts, device
        self.tracked = [float(s) for s in tracked_stds]
        self.stds = list(opts.eval_stds or self.tracked)
        try:
            self.metrics = report.parse_metrics(','.join(opts.eval_metrics))
            if report.is_adm(self.metrics):
                raise evaluate.MetricError('the ADM metrics need an ADM reference batch; use fid, fd_dinov2, '
                                           'precision or recall during training')
            self.reference = inputs.load_checked_reference(opts.eval_ref, self.metrics, PR_FEATURES)
            self.detectors = inputs.load_detectors(evaluate.detectors_for(self.metrics, PR_FEATURES), device,
                                                   opts.inception_weights, opts.dinov2_weights)
        except EDM2Error as e:
            raise TrainingError(f'--eval: {one_line(e)}') from None
        self.keep, self.extra = report.kept_features(self.metrics, PR_FEATURES)

    def _is_tracked(self, std):
        return any(abs(std - t) < 5e-4 for t in self.tracked)

    def networks(self, outdir, nimg):
        """Yield (std, net, encoder, reconstructed) at the snapshot time `nimg`: the tracked lengths of --eval-stds
        from their snapshots, then the others reconstructed one at a time (one network in memory at once)."""
        kimg = nimg // 1000
        others = [s for s in self.stds if not self._is_tracked(s)]
        for std in self.stds:
            if std not in others:
                path = os.path.join(outdir, checkpoint.snapshot_file_name(SNAPSHOT_PREFIX, kimg, std))
                net, encoder, _ = checkpoint.load_snapshot(path, device=self.device)
                yield std, net, encoder, False
        if others:
            snapshots = [s for s in find_snapshots(outdir, SNAPSHOT_PREFIX) if s.nimg <= nimg]
            for rec in reconstruct(snapshots, others, kimg, batch=1, device='cpu'):
                yield rec.std, rec.net.to(self.device), rec.encoder, True

    def evaluate(self, net, encoder):
        """{metric: value} on rank 0 (None elsewhere) of `net`'s images of seeds 0 .. --eval-num - 1."""
        stats, _ = network_features.generated_stats(
            net, range(self.opts.eval_num), self.detectors, self.device, guidance=sampling.Guidance(),
            sigmas=sampling.edm_schedule(self.opts.eval_steps), classes='random', encoder=encoder, batch_size=self.opts.eval_batch,
            keep=self.keep, extra=self.extra)
        if not distributed.is_main():
            return None
        return report.evaluate_run(stats, self.reference, self.metrics, PR_FEATURES, 'float16', 0, self.device)

    def run(self, outdir, nimg):
        """Evaluate every length at time `nimg`; rank 0 appends the lines to metrics.jsonl and returns them."""
        lines = []
        for std, net, encoder, reconstructed in self.networks(outdir, nimg):
            start = time.time()
            values = self.evaluate(net, encoder)
            seconds = time.time() - start
            del net
            if values is not None:
                lines += [dict(kimg=nimg / 1000, nimg=nimg, ema_std=std, metric=name, value=float(value),
                               images=self.opts.eval_num, seconds=seconds, reconstructed=reconstructed)
                          for name, value in values.items()]
        if distributed.is_main():
            path = metrics_path(outdir)
            text = ''.join(jsontext.dumps(line, 'metrics.jsonl') + '\n' for line in lines)
            with reporting_full_disk(path), open_append(path) as f:
                f.write(text)  # a line cut short is dropped on resume
        return lines
