"""Benchmark of the sweep's coordinate search (`calculate_metrics.py sweep --search descent`): how many cells
of a grid it evaluates before it stops, on smooth unimodal synthetic surfaces, against the whole grid.

The grid is docs/sweep.md's example, 13 main EMA lengths x 7 guide EMA lengths x 7 guidance weights = 637
cells; each surface is a quadratic bowl with a random optimum (uniform over the grid), unequal curvature
per axis and a cross term between the two EMA lengths. Prints the cells evaluated (min, mean, max) and how
often the search ended on the grid's own best cell. No networks: it runs in a second.

    python bench/descent.py                      # 50 random optima on the 13 x 7 x 7 grid
    python bench/descent.py --shape 9,7,8 --trials 200
"""

import click
import numpy as np

from edm2.sweep import plan as sweep_plan


def surface(centre, scale=(1.0, 2.0, 0.5), cross=0.3):
    def f(cell):
        d = np.asarray(cell, dtype=float) - centre
        return float(np.dot(np.asarray(scale) * d, d) + cross * d[0] * d[1])
    return f


@click.command(help=__doc__)
@click.option('--shape', default='13,7,7', show_default=True, help='Cells per axis: main std, guide std, weight.')
@click.option('--trials', default=50, show_default=True, help='Random optima.')
@click.option('--seed', default=0, show_default=True)
def main(shape, trials, seed):
    shape = tuple(int(v) for v in shape.split(','))
    rng = np.random.RandomState(seed)
    visited, found = [], 0
    for _ in range(trials):
        f = surface(rng.uniform(0, 1, len(shape)) * (np.array(shape) - 1))
        best_grid = min(np.ndindex(*shape), key=f)
        best, _, values = sweep_plan.coordinate_descent(shape, f)
        visited.append(len(values))
        found += best == best_grid
    total = int(np.prod(shape))
    print(f'grid {" x ".join(map(str, shape))} = {total} cells, {trials} random optima (seed {seed}): the search '
          f'evaluated {min(visited)}-{max(visited)} cells (mean {np.mean(visited):.0f}, '
          f'{np.mean(visited) / total:.1%} of the grid) and ended on the grid\'s best cell {found} of {trials} times')


if __name__ == '__main__':
    main()
