"""Training curves without any service: the loss, the loss per noise level and the metrics of one or more
runs against training time (kimg), read from each run folder's stats.jsonl and metrics.jsonl and overlaid.

    python -m edm2.plots runs/00000-tiny runs/00001-tiny --out curves.png

Needs matplotlib (the `toy` extra). Errors are one line (`PlotError`); a line cut short by a killed run
is skipped, as the trainer skips it on resume.
"""

import argparse
import json
import os
import sys

from edm2.errors import EDM2Error, one_line
from edm2.fileio import atomic_write

LINESTYLES = ('-', '--', ':', '-.')


class PlotError(EDM2Error):
    """A run folder or output that cannot be used; one-line message."""


def read_jsonl(path):
    """The records of a .jsonl file (none when it is missing), skipping lines that do not parse."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and 'kimg' in record:
                records.append(record)
    return records


def read_run(folder):
    """{'stats': [...], 'metrics': [...]} of a run folder; PlotError when it holds neither file."""
    if not os.path.isdir(folder):
        raise PlotError(f'{folder}: no such folder')
    run = dict(stats=read_jsonl(os.path.join(folder, 'stats.jsonl')),
               metrics=read_jsonl(os.path.join(folder, 'metrics.jsonl')))
    if not run['stats'] and not run['metrics']:
        raise PlotError(f'{folder}: no stats.jsonl or metrics.jsonl lines (not a training run folder?)')
    return run


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError('drawing curves needs matplotlib: pip install "edm2[toy]"') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def bucket_labels(edges):
    """Labels of the ln σ buckets with upper edges `edges` (the last bucket is open): 'ln_sigma<=-3',
    '-3<ln_sigma<=-2', ..., 'ln_sigma>3'."""
    inner = [f'{lo:g}<ln_sigma<={hi:g}' for lo, hi in zip(edges[:-1], edges[1:])]
    return [f'ln_sigma<={edges[0]:g}', *inner, f'ln_sigma>{edges[-1]:g}']


def draw(runs, out, dpi=100):
    """Write the figure of `runs` ({label: read_run(...)}) to the PNG file `out`."""
    plt = _pyplot()
    fig, (ax_loss, ax_sigma, ax_metric) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.get_cmap('viridis')
    for k, (name, run) in enumerate(runs.items()):
        style = LINESTYLES[k % len(LINESTYLES)]
        stats = run['stats']
        kimg = [r['kimg'] for r in stats]
        edges = next((r['loss_sigma_edges'] for r in reversed(stats) if r.get('loss_sigma_edges')), None)
        labels = bucket_labels(edges) if edges else []
        ax_loss.plot(kimg, [r.get('loss') for r in stats], style, label=name)
        for b, label in enumerate(labels):
            values = [r['loss_sigma'][b] if len(r.get('loss_sigma') or []) > b else None for r in stats]
            points = [(x, v) for x, v in zip(kimg, values) if v is not None]
            if points:
                ax_sigma.plot(*zip(*points), style, color=colours(b / max(len(labels) - 1, 1)),
                              label=label if k == 0 else None)
        series = {}
        for r in run['metrics']:
            series.setdefault((r['metric'], r['ema_std']), []).append((r['kimg'], r['value']))
        for (metric, std), points in sorted(series.items()):
            ax_metric.plot(*zip(*sorted(points)), style, marker='o', markersize=3,
                           label=f'{name}: {metric} ema {std:.3f}')
    for ax, title in ((ax_loss, 'loss'), (ax_sigma, 'loss per noise level'), (ax_metric, 'metrics')):
        ax.set_title(title)
        ax.set_xlabel('kimg')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_write(out) as f:
            fig.savefig(f, format='png', dpi=dpi)
    except OSError as e:
        raise PlotError(f'--out {out}: {one_line(e)}') from None
    finally:
        plt.close(fig)


def run_labels(folders):
    """Legend labels: the folder names, made unique with their parents where they repeat."""
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    return [os.path.normpath(f) if names.count(n) > 1 else n for f, n in zip(folders, names)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m edm2.plots', description='Draw the loss, the loss per noise '
                                     'level and the metrics of training runs against kimg.')
    parser.add_argument('runs', nargs='+', metavar='RUN', help='run folders (train_edm2.py --outdir)')
    parser.add_argument('--out', required=True, metavar='PNG', help='the figure to write')
    args = parser.parse_args(argv)
    try:
        draw({label: read_run(folder) for label, folder in zip(run_labels(args.runs), args.runs)}, args.out)
    except EDM2Error as e:
        print(f'Error: {one_line(e)}', file=sys.stderr)
        return 1
    print(f'Wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
