"""The figures of the toy example: the five panels of the autoguidance paper's Figure 1 (ground truth,
unguided, CFG, autoguidance, naive truncation), one row per set of models, with each panel's measured
outlier rate and leaf coverage; and autoguidance under several guidance rules at one weight, with each
panel's outlier rate and branch TV (needs matplotlib, the `toy` extra)."""

import torch

from edm2.fileio import atomic_path, open_temporary
from edm2.toy.mixture import ToyError, gt


def pyplot():
    """matplotlib.pyplot on the file-only backend; a one-line ToyError when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToyError('plotting needs matplotlib: pip install -e ".[toy]"') from None
    return plt


def draw_figure(path, rows, level, weights, max_points=6000, dpi=90):
    """rows: [(label or None, samples, results)], one row of the five panels each."""
    titles = {'ground truth': '(a) ground truth, class A', 'unguided': '(b) unguided',
              'CFG': f'(c) CFG, w={weights["cfg"]:g}', 'autoguidance': f'(d) autoguidance, w={weights["ag"]:g}',
              'naive truncation': f'(e) naive truncation, w={weights["trunc"]:g}'}
    _draw_rows(path, rows, level, max_points, dpi, lambda name, r: (titles[name], None))


def draw_rules_figure(path, rows, level, weight, max_points=6000, dpi=90):
    """rows: [(label or None, {rule spec: samples}, {rule spec: results})], autoguidance at weight `weight`
    under each rule; each panel's title gives its outlier rate and branch TV."""
    _draw_rows(path, rows, level, max_points, dpi, lambda spec, r: (
        spec, f'w={weight:g}: outliers {r["outlier_rate"]:.2%}, branch TV {r["branch_tv"]:.3f}'))


def _draw_rows(path, rows, level, max_points, dpi, title_of):
    """One row of panels per (label, {name: samples}, {name: results}); title_of(name, results) gives a
    panel's (title, caption or None)."""
    plt = pyplot()
    mixture = gt('A')
    grid = density_grid(mixture)
    ncols = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.0 * ncols, 3.35 * len(rows)), squeeze=False)
    for (label, samples, results), row in zip(rows, axes):
        if label:
            row[0].set_ylabel(label, fontsize=8.5)
        for ax, (name, x) in zip(row, samples.items()):
            title, caption = title_of(name, results[name])
            draw_panel(ax, x, results[name], title, mixture, grid, level, max_points, caption)
    save(plt, fig, path, dpi)


def density_grid(mixture, lo=(-0.65, -0.55), hi=(1.6, 1.45), res=240):
    """(x ticks, y ticks, log-density [res, res]) of the mixture over the figure's window."""
    gx = torch.linspace(lo[0], hi[0], res, dtype=torch.float64)
    gy = torch.linspace(lo[1], hi[1], res, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(gx, gy, indexing='xy'), dim=-1).reshape(-1, 2)
    return gx.numpy(), gy.numpy(), mixture.logp(points).reshape(res, res).numpy()


def save(plt, fig, path, dpi):
    """Write the figure as PNG under a temporary name, then rename (no half-written file)."""
    fig.tight_layout(pad=0.4)
    try:
        with atomic_path(path) as tmp, open_temporary(tmp) as f:
            fig.savefig(f, dpi=dpi, format='png')
    finally:
        plt.close(fig)


def draw_panel(ax, x, r, title, mixture, grid, level, max_points, caption=None):
    """Ground truth's 99%-mass region (light blue), the samples (black) and the outliers among them (red)."""
    gx, gy, dens = grid
    ax.contourf(gx, gy, dens, levels=[level, dens.max() + 1], colors=['#dfe7f2'])
    ax.contour(gx, gy, dens, levels=[level], colors=['#8ba3c7'], linewidths=0.5)
    x = x[:max_points].numpy()
    out = mixture.logp(torch.as_tensor(x, dtype=torch.float64)).numpy() < level
    ax.scatter(x[~out, 0], x[~out, 1], s=0.6, c='#1b1b1b', linewidths=0, rasterized=True)
    ax.scatter(x[out, 0], x[out, 1], s=1.5, c='#d62728', linewidths=0, rasterized=True)
    caption = caption or f'outliers {r["outlier_rate"]:.1%}, leaf coverage {r["leaf_coverage"]:.0%}'
    ax.set_title(f'{title}\n{caption}', fontsize=8.5)
    ax.set_xlim(gx[0], gx[-1])
    ax.set_ylim(gy[0], gy[-1])
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
