"""The order in which an autoguidance sweep visits its cells, and the coordinate search.

A cell is one (main EMA length, guide EMA length, guidance weight w, guidance rule, guidance interval),
indexed (i, j, k, r, v) into the five axes. Networks are reconstructed in batches (post-hoc EMA, EDM2 paper sec. 3.3): the grid order visits
every cell of one batch of main networks with one batch of guides before moving on, so that each
reconstruction is used fully before it is dropped (autoguidance paper sec. 5 tunes these three knobs).

    grid_chunks(num_main, num_guide, main_batch, guide_batch)   batches of (main indices, guide indices)
    count_reconstructions(...)                                   how many networks the grid order builds
    coordinate_descent(shape, objective, start=None, categorical=())   axis-by-axis search on an index grid
"""

import math

# Metrics where a larger value is better; every other metric (FID, FD_DINOv2, ...) is minimised.
HIGHER_IS_BETTER = frozenset({'precision', 'recall'})


def score(metric, value):
    """A number to minimise for `metric` (its value, negated where larger is better)."""
    return -float(value) if metric in HIGHER_IS_BETTER else float(value)


def _chunks(n, size):
    size = n if size is None or size <= 0 else min(int(size), n)
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def grid_chunks(num_main, num_guide, main_batch, guide_batch):
    """[(main indices, guide indices), ...] in visiting order, and whether the guide axis is the outer one.

    The axis whose networks would otherwise be rebuilt more often goes outside: with every guide held
    (guide_batch >= num_guide) the guides are built once and the main networks once per batch, i.e.
    each network exactly once. Otherwise the inner axis is rebuilt once per outer batch, and the order
    with fewer reconstructions is chosen.
    """
    main, guide = _chunks(num_main, main_batch), _chunks(num_guide, guide_batch)
    main_outer = num_main + (num_guide if len(guide) == 1 else len(main) * num_guide)
    guide_outer = num_guide + (num_main if len(main) == 1 else len(guide) * num_main)
    if main_outer <= guide_outer:
        return [(m, g) for m in main for g in guide], False
    return [(m, g) for g in guide for m in main], True


def count_reconstructions(num_main, num_guide, main_batch, guide_batch):
    """(main, guide) networks the grid order reconstructs when every cell is evaluated."""
    chunks, _ = grid_chunks(num_main, num_guide, main_batch, guide_batch)
    held_main, held_guide, built_main, built_guide = None, None, 0, 0
    for m, g in chunks:
        if m != held_main:
            built_main, held_main = built_main + len(m), m
        if g != held_guide:
            built_guide, held_guide = built_guide + len(g), g
    return built_main, built_guide


def middle(shape):
    """The start of the coordinate search: the middle of each axis (the lower middle for even sizes)."""
    return tuple((n - 1) // 2 for n in shape)


def coordinate_descent(shape, objective, start=None, categorical=()):
    """Minimise `objective(cell) -> float` over the index grid `shape` by coordinate search.

    From `start` (default: the middle), take one axis at a time and move to the better of the two
    neighbours along it while that improves; cycle through the axes until a full pass moves nowhere.
    Along a `categorical` axis (values without an order, such as guidance rules) every other value is a
    neighbour. Each cell is evaluated at most once (values are remembered), so the caller may count evaluations.
    Returns (best cell, its value, {cell: value} of every evaluated cell in evaluation order).
    """
    values = {}

    def f(cell):
        if cell not in values:
            values[cell] = float(objective(cell))
        return values[cell]

    cur = tuple(start) if start is not None else middle(shape)
    best = f(cur)
    moved = True
    while moved:
        moved = False
        for axis in range(len(shape)):
            while True:
                options = []
                steps = [n - cur[axis] for n in range(shape[axis]) if n != cur[axis]] if axis in categorical \
                    else (-1, 1)
                for step in steps:
                    cell = list(cur)
                    cell[axis] += step
                    if 0 <= cell[axis] < shape[axis]:
                        options.append((f(tuple(cell)), tuple(cell)))
                if not options:
                    break
                value, cell = min(options)
                if not value < best:  # NaN never wins
                    break
                cur, best, moved = cell, value, True
    return cur, best, values


def num_cells(shape):
    return math.prod(shape)
