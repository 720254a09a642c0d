"""What a sweep reports: its plan before it starts; once finished, sweep.json with the best cell per
metric, a printed table, figures, and the best pair of networks written out with the command lines that
reproduce the best cell.

Figures (matplotlib, an optional extra, imported here only): per metric, a heatmap over
(main EMA length x guide EMA length) of the best value over w, rule and interval, with that w (and rule,
interval where there are several) written in each cell, and the metric against w for the best EMA pair,
one line per rule, each point the best over the intervals.
"""

import math
import os
import shlex

import numpy as np

from edm2 import distributed
from edm2.checkpoint import save_network
from edm2.fileio import atomic_path, open_temporary

from . import axes as sweep_axes
from . import plan as sweep_plan
from .log import write_settings
from .run import best_networks

FIGURE_NAMES = ('sweep-{metric}-heatmap.png', 'sweep-{metric}-guidance.png')


def best_cells(records, metrics):
    """{metric: the record with the best value} (lowest, or highest for precision/recall)."""
    best = {}
    for m in metrics:
        finite = [r for r in records if r.get(m) is not None and math.isfinite(r[m])]
        if finite:
            best[m] = min(finite, key=lambda r: sweep_plan.score(m, r[m]))
    return best


def _fmt(v):
    return '-' if v is None else f'{v:.3f}'


def _rule(record):
    return record.get('rule', 'lerp')


def _extra_axes(records):
    """The rule and interval columns worth showing: those with more than one value, or a value not the default."""
    rules = {_rule(r) for r in records}
    intervals = {r.get('interval') for r in records}
    return (rules != {'lerp'}), (intervals != {None})


def _where(record):
    """'net_std 0.05, gnet_std 0.08, w 2, rule lerp[, interval sigma:...]' of a record."""
    text = f'net_std {record["net_std"]}, gnet_std {record["gnet_std"]}, w {record["guidance"]:g}, rule {_rule(record)}'
    return text + (f', interval {record["interval"]}' if record.get('interval') is not None else '')


def table(records, metrics, best):
    """The cells as text, one row each (grid order), best value per metric marked with '*'."""
    show_rule, show_interval = _extra_axes(records)
    rule_width = max([len(_rule(r)) for r in records] + [4])
    interval_width = max([len(str(r.get('interval'))) for r in records] + [8])
    head = f'{"net_std":>8} {"gnet_std":>8} {"w":>6}' + (f' {"rule":<{rule_width}}' if show_rule else '') + \
        (f' {"interval":<{interval_width}}' if show_interval else '') + ''.join(f'{m:>14}' for m in metrics)
    lines = [head, '-' * len(head)]
    for r in records:
        row = f'{_fmt(r["net_std"]):>8} {_fmt(r["gnet_std"]):>8} {r["guidance"]:>6.3f}'
        row += f' {_rule(r):<{rule_width}}' if show_rule else ''
        row += f' {str(r.get("interval")):<{interval_width}}' if show_interval else ''
        for m in metrics:
            mark = '*' if best.get(m) is r else ' '
            row += f'{r[m]:>13.4f}{mark}'
        lines.append(row)
    return '\n'.join(lines)


def plan_lines(config):
    """The plan printed before a sweep starts: its cells, where each axis's networks come from, the memory
    bound and how many networks the full grid reconstructs."""
    m, g, w, r, v = config.shape
    main_cap, guide_cap = config.memory_bound()
    rec_m, rec_g = config.planned_reconstructions()
    lines = [f'Sweep: {m} main EMA lengths x {g} guide EMA lengths x {w} guidance weights x {r} rules x '
             f'{v} intervals = {sweep_plan.num_cells(config.shape)} cells ({config.search}), {config.num} images '
             f'each, {config.steps} steps']
    for source in (config.net, config.gnet):
        lines.append(f'  {source.flag}: {source.summary()}')
    lines.append(f'  rules: {", ".join(str(rule) for rule in config.rules)}')
    lines.append(f'  intervals: {", ".join(str(sweep_axes.interval_spec(i) or "every step") for i in config.intervals)}')
    lines.append(f'Memory bound: {main_cap} main + {guide_cap} guide networks held, plus one input snapshot '
                 f'while reconstructing')
    lines.append(f'Reconstructions (full grid): {rec_m} main + {rec_g} guide = {rec_m + rec_g}' +
                 ('; the coordinate search builds them as it goes' if config.search == 'descent' else ''))
    return lines


def finish(config, outdir, result, device, save_best=False):
    """After `edm2.sweep.run.run_sweep`: sweep.json with the best cells and a summary of the run; on rank 0 the
    printed results and the figures, and with `save_best` the best networks and their command lines."""
    records, descent = result['cells'], result['descent']
    best = best_cells(records, config.metrics)
    summary = dict(cells=len(records), evaluated_this_run=result['evaluated'], counter=result['counter'],
                   seconds=result['seconds'], descent=descent)
    write_settings(outdir, config, best=best, extra=dict(result=summary))
    if not distributed.is_main():
        return
    _print_results(outdir, records, config, best, descent)
    if save_best and best:
        r = best[config.metrics[0]]
        net_path, gnet_path = save_network_pair(outdir, *best_networks(config, r, device), r, config)
        net_path, gnet_path = config.net.flag_value(net_path), config.gnet.flag_value(gnet_path)
        print(f'Best networks for {config.metrics[0]}: {net_path}, {gnet_path}', flush=True)
        for line in command_lines(net_path, gnet_path, r, config):
            print(f'  {line}', flush=True)


def _print_results(outdir, records, config, best, descent):
    """The table of cells, where the coordinate search stopped (`descent`, None for a grid) and the best
    cell of each metric; then the figures and where the files are."""
    lines = [table(records, config.metrics, best)]
    if descent is not None:
        lines.append(f'Coordinate search on {config.metrics[0]}: stopped after evaluating '
                     f'{descent["visited"]} of {sweep_plan.num_cells(config.shape)} cells')
    for m, r in best.items():
        lines.append(f'Best {m}: {r[m]:.4f} at {_where(r)}')
    print('\n'.join(lines), flush=True)
    figures(outdir, records, config.metrics, config.net.stds, config.gnet.stds, best)
    print(f'Cells in {os.path.join(outdir, "cells.jsonl")}, summary in {os.path.join(outdir, "sweep.json")}',
          flush=True)


def _surface(records, metric, net_stds, gnet_stds):
    """[gnet, net] arrays of the best value over w, rule and interval, and [gnet, net] lists of the record
    giving it (NaN / None where no cell was evaluated)."""
    value = np.full([len(gnet_stds), len(net_stds)], np.nan)
    where = [[None] * len(net_stds) for _ in gnet_stds]
    pos_n = {None if s is None else round(s, 6): n for n, s in enumerate(net_stds)}
    pos_g = {None if s is None else round(s, 6): n for n, s in enumerate(gnet_stds)}
    for r in records:
        a = pos_g[None if r['gnet_std'] is None else round(r['gnet_std'], 6)]
        b = pos_n[None if r['net_std'] is None else round(r['net_std'], 6)]
        if math.isnan(value[a, b]) or sweep_plan.score(metric, r[metric]) < sweep_plan.score(metric, value[a, b]):
            value[a, b], where[a][b] = r[metric], r
    return value, where


def _digits(values):
    """Decimals that tell the values of a figure apart (their spread's first two significant digits)."""
    spread = np.nanmax(values) - np.nanmin(values)
    return 2 if not spread > 0 else int(min(max(2 - math.floor(math.log10(spread)), 0), 6))


def _position(stds, std):
    return next(n for n, s in enumerate(stds) if (s is None and std is None) or
                (s is not None and std is not None and abs(s - std) < 1e-9))


def figures(outdir, records, metrics, net_stds, gnet_stds, best):
    """Write the PNG figures; returns their paths, or None (one line printed) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('Figures skipped: matplotlib is not installed (pip install matplotlib).')
        return None
    paths = []
    labels = lambda stds: ['file' if s is None else f'{s:.3f}' for s in stds]  # noqa: E731
    for m in metrics:
        if m not in best:
            continue
        value, where = _surface(records, m, net_stds, gnet_stds)
        show_rule, show_interval = _extra_axes(records)
        rules = list(dict.fromkeys(_rule(r) for r in records))
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(net_stds), 1.0 + 0.7 * len(gnet_stds)), dpi=100)
        cmap = 'viridis' if m in sweep_plan.HIGHER_IS_BETTER else 'viridis_r'
        im = ax.imshow(value, origin='lower', cmap=cmap, aspect='auto')
        digits = _digits(value)
        lo, hi = np.nanmin(value), np.nanmax(value)
        for a in range(value.shape[0]):
            for b in range(value.shape[1]):
                if not math.isnan(value[a, b]):
                    light = (value[a, b] - lo) / (hi - lo) if hi > lo else 0.5
                    light = light if m in sweep_plan.HIGHER_IS_BETTER else 1 - light
                    r = where[a][b]
                    text = f'{value[a, b]:.{digits}f}\nw={r["guidance"]:g}'
                    text += f'\nrule {rules.index(_rule(r)) + 1}' if len(rules) > 1 else ''
                    text += f'\n{r.get("interval") or "all steps"}' if show_interval else ''
                    ax.text(b, a, text, ha='center', va='center', fontsize=7, color='black' if light > 0.6 else 'white')
        bn, bg = _position(net_stds, best[m]['net_std']), _position(gnet_stds, best[m]['gnet_std'])
        ax.add_patch(plt.Rectangle((bn - 0.5, bg - 0.5), 1, 1, fill=False, edgecolor='red', lw=2))
        ax.set_xticks(range(len(net_stds)), labels(net_stds))
        ax.set_yticks(range(len(gnet_stds)), labels(gnet_stds))
        ax.set_xlabel('main network EMA length (net_std)')
        ax.set_ylabel('guide EMA length (gnet_std)')
        over = 'guidance w' + (', rule' if len(rules) > 1 else '') + (', interval' if show_interval else '')
        title = f'{m}: best over {over}'
        title += ('\nrules: ' + '; '.join(f'{n + 1} = {rule}' for n, rule in enumerate(rules))) if len(rules) > 1 \
            else (f' (rule {rules[0]})' if show_rule else '')
        ax.set_title(title, fontsize=9 if len(rules) > 1 else None)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(os.path.join(outdir, FIGURE_NAMES[0].format(metric=m)))
        with atomic_path(paths[-1]) as tmp, open_temporary(tmp) as f:  # never through a planted link
            fig.savefig(f, format='png')
        plt.close(fig)

        b = best[m]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for rule in rules:
            curve = {}  # w -> best value over the intervals, at the best EMA pair
            for r in records:
                if r['net_std'] == b['net_std'] and r['gnet_std'] == b['gnet_std'] and _rule(r) == rule and \
                        (r['guidance'] not in curve or
                         sweep_plan.score(m, r[m]) < sweep_plan.score(m, curve[r['guidance']])):
                    curve[r['guidance']] = r[m]
            ws = sorted(curve)
            ax.plot(ws, [curve[w] for w in ws], 'o-', label=rule)
        if len(rules) > 1:
            ax.legend(fontsize=7)
        ax.axvline(b['guidance'], color='gray', lw=0.8, ls='--')
        ax.set_xlabel('guidance weight w')
        ax.set_ylabel(m)
        ax.set_title(f'{m} vs w at net_std {_fmt(b["net_std"])}, gnet_std {_fmt(b["gnet_std"])}' +
                     (f'\nrule {rules[0]}' if len(rules) == 1 and show_rule else '') +
                     ('\nbest over intervals' if show_interval else ''), fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(outdir, FIGURE_NAMES[1].format(metric=m)))
        with atomic_path(paths[-1]) as tmp, open_temporary(tmp) as f:  # never through a planted link
            fig.savefig(f, format='png')
        plt.close(fig)
    return paths


def save_network_pair(outdir, net_pair, gnet_pair, record, config):
    """Write the best cell's networks as native .safetensors; returns (net path, gnet path), gnet path None
    for a self guide (nothing to write)."""
    paths = []
    for pair, source, std, name in ((net_pair, config.net, record['net_std'], 'net'),
                                    (gnet_pair, config.gnet, record['gnet_std'], 'gnet')):
        if pair is None:
            paths.append(None)
            continue
        net, encoder = pair
        label = 'file' if std is None else f'{std:.3f}'
        path = os.path.join(outdir, f'best-{name}-{label}.safetensors')
        prov = record[name]
        save_network(path, net, encoder, ema_std=std, phema=prov, **source.metadata())
        paths.append(path)
    return paths


def command_lines(net_path, gnet_path, record, config):
    """Ready `generate_images.py` and `calculate_metrics.py gen` lines reproducing the best cell."""
    common = ['--net', net_path, '--gnet', gnet_path, '--guidance', f'{record["guidance"]:g}',
              '--steps', str(config.steps)]
    if _rule(record) != 'lerp':
        common += ['--guidance-rule', _rule(record)]
    common += sweep_axes.interval_flags(record.get('interval'))
    gen = ['python', 'generate_images.py', *common, '--seeds', f'{config.seed}-{config.seed + 63}',
           '--outdir', 'out-best']
    calc = ['python', 'calculate_metrics.py', 'gen', *common, '--ref', str(config.ref_name),
            '--metrics', ','.join(config.metrics), '--num', str(config.num), '--seed', str(config.seed)]
    return shlex.join(gen), shlex.join(calc)
