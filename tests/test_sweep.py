"""calculate_metrics.py sweep: cells equal reconstruct_phema.py + calculate_metrics.py gen, snapshot reads
and reconstructions counted, resume after kill -9, the coordinate search, torchrun, one-line errors."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import (cells_by_key, detector_flags, self_sweep_args, sweep_args, sweep_cells, sweep_config, synthetic_surface,
                     tiny_sweep_net)

from edm2.commands import calculate_metrics
from edm2.commands import reconstruct_phema
from edm2.checkpoint import load_snapshot, save_network
from edm2.encoders import StandardRGBEncoder
from edm2.sweep import run as sweep_lib
from edm2.sweep import plan as sweep_plan
from edm2.sweep import source as sweep_source
from edm2.networks import build_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_thread')


def _invoke(cli, args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.replace('\r', '\n').splitlines() if line.strip()]
    assert 'Traceback' not in result.output
    assert lines[-1].startswith('Error:'), result.output
    for f in fragments:
        assert f in lines[-1], lines[-1]


# ----------------------------------------------------------------------------------------------------
# Order and search (pure).

def test_grid_order_reconstructs_each_network_once_when_guides_fit():
    for m, g, bm in ((8, 7, 3), (5, 2, 5), (1, 4, 1), (6, 6, 2)):
        assert sweep_plan.count_reconstructions(m, g, bm, g) == (m, g)
        chunks, _ = sweep_plan.grid_chunks(m, g, bm, g)
        cells = {(i, j) for mc, gc in chunks for i in mc for j in gc}
        assert cells == {(i, j) for i in range(m) for j in range(g)}  # every pair exactly once
        assert sum(len(mc) * len(gc) for mc, gc in chunks) == m * g
    # Guides in batches too: the inner axis is rebuilt per outer batch; the cheaper order is taken.
    assert sweep_plan.count_reconstructions(8, 6, 4, 3) == (8, 12)  # main outside: 8 + 2 x 6 < 6 + 2 x 8
    assert sweep_plan.count_reconstructions(8, 6, 2, 6) == (8, 6)


def _quadratic(centre, scale=(1.0, 2.0, 0.5), cross=0.3):
    def f(cell):
        d = np.array(cell, dtype=float) - np.array(centre)
        return float(np.dot(np.array(scale) * d, d) + cross * d[0] * d[1])
    return f


def test_coordinate_descent_finds_grid_optimum_with_fewer_cells():
    shape = (9, 7, 8)
    rng = np.random.RandomState(0)
    for _ in range(20):
        centre = rng.uniform(0, 1, 3) * (np.array(shape) - 1)
        f = _quadratic(centre)
        grid = {c: f(c) for c in np.ndindex(*shape)}
        best_grid = min(grid, key=grid.get)
        calls = []
        best, value, values = sweep_plan.coordinate_descent(shape, lambda c: calls.append(c) or f(c))
        assert best == best_grid and value == grid[best_grid]
        assert len(calls) == len(set(calls)) == len(values) < len(grid) // 3  # each cell once; far fewer
    # A flat surface stops at once (after the start and its neighbours).
    _, _, values = sweep_plan.coordinate_descent(shape, lambda c: 1.0)
    assert len(values) == 1 + 2 * 3


# ----------------------------------------------------------------------------------------------------
# Library runs with a metric function of their own (no sampling): work, descent, resume checks.

class _CountingLoader:
    """Snapshot reader counting reads per file, and the reads made within each reconstruction batch."""

    def __init__(self):
        self.reads = []

    def __call__(self, source, device):
        self.reads.append(os.path.basename(str(source)))
        return load_snapshot(source, device=device)


def test_each_snapshot_read_once_per_batch_and_each_std_reconstructed_once(sweep_assets, tmp_path, monkeypatch):
    built = []
    real = sweep_source.reconstruct_phema
    monkeypatch.setattr(sweep_source, 'reconstruct_phema',
                        lambda snaps, stds, *a, **k: built.append(list(stds)) or real(snaps, stds, *a, **k))
    loader = _CountingLoader()
    config = sweep_config(sweep_assets, phema_batch=2)
    result = sweep_lib.run_sweep(config, tmp_path / 'out', cell_metrics=synthetic_surface, loader=loader, progress=False)
    assert len(result['cells']) == len(sweep_cells(tmp_path / 'out')) == 3 * 2 * 3
    # Main stds in batches of 2 (2 + 1), all guides at once: each std exactly once.
    assert built == [[0.05, 0.07], [0.05, 0.08], [0.09]]
    assert result['counter']['reconstructions'] == 3 + 2 == sum(config.planned_reconstructions())
    # The main run has 6 snapshots at kimg 1-3; the guide 4 at kimg <= 2. One read of each per batch.
    main_inputs = [os.path.basename(s.source) for s in config.net.inputs]
    guide_inputs = [os.path.basename(s.source) for s in config.gnet.inputs]
    assert loader.reads == main_inputs + guide_inputs + main_inputs
    assert len(main_inputs) == 6 and len(guide_inputs) == 4
    # Every record names its snapshots and coefficients (summing to 1).
    rec = result['cells'][0]
    assert rec['net']['inputs'] == main_inputs and abs(sum(rec['net']['coefficients']) - 1) < 1e-9
    # With the bound below the guide count, guides are rebuilt per batch but each read once per batch.
    loader.reads.clear()
    built.clear()
    config = sweep_config(sweep_assets, phema_batch=3, guide_batch=1)
    sweep_lib.run_sweep(config, tmp_path / 'out2', cell_metrics=synthetic_surface, loader=loader, progress=False)
    assert built == [[0.05, 0.07, 0.09], [0.05], [0.08]]
    assert loader.reads == main_inputs + guide_inputs + guide_inputs


def test_descent_finds_grid_optimum_with_fewer_cells(sweep_assets, tmp_path):
    stds, gstds, ws = (0.05, 0.06, 0.07, 0.08, 0.09), (0.05, 0.06, 0.07, 0.08), (1.0, 1.5, 2.0, 2.5, 3.0)
    grid = sweep_lib.run_sweep(sweep_config(sweep_assets, stds, gstds, ws), tmp_path / 'grid', cell_metrics=synthetic_surface,
                               progress=False)
    best_grid = min(grid['cells'], key=lambda r: r['fid'])
    desc = sweep_lib.run_sweep(sweep_config(sweep_assets, stds, gstds, ws, search='descent'), tmp_path / 'desc',
                               cell_metrics=synthetic_surface, progress=False)
    cells = sweep_cells(tmp_path / 'desc')
    assert desc['descent']['visited'] == len(cells) < len(grid['cells']) // 3
    assert desc['descent']['cell'] == sweep_lib.cell_key(best_grid['net_std'], best_grid['gnet_std'],
                                                         best_grid['guidance'])
    assert min(cells, key=lambda r: r['fid'])['fid'] == best_grid['fid']
    # Running the same search again evaluates nothing new.
    again = sweep_lib.run_sweep(sweep_config(sweep_assets, stds, gstds, ws, search='descent'), tmp_path / 'desc',
                                cell_metrics=synthetic_surface, progress=False)
    assert again['evaluated'] == 0 and again['counter'] == {} and len(sweep_cells(tmp_path / 'desc')) == len(cells)


def test_resume_skips_finished_cells_and_refuses_changed_settings(sweep_assets, tmp_path):
    out = tmp_path / 'out'
    first = sweep_lib.run_sweep(sweep_config(sweep_assets, net_stds=(0.05, 0.07)), out, cell_metrics=synthetic_surface, progress=False)
    # A wider grid reuses the 12 finished cells and reconstructs only the new main std.
    wider = sweep_lib.run_sweep(sweep_config(sweep_assets), out, cell_metrics=synthetic_surface, progress=False)
    assert first['evaluated'] == 12 and wider['evaluated'] == 6 and wider['counter']['reconstructions'] == 1 + 2
    assert len(sweep_cells(out)) == 18
    with pytest.raises(sweep_lib.SweepError, match='--num'):
        sweep_lib.run_sweep(sweep_config(sweep_assets, num=8), out, cell_metrics=synthetic_surface, progress=False)
    # A cut-off last line (killed while writing) is dropped and that cell recomputed.
    with open(out / 'cells.jsonl', 'rb') as f:
        data = f.read()
    lines = data.split(b'\n')
    (out / 'cells.jsonl').write_bytes(b'\n'.join(lines[:-2]) + b'\n' + lines[-2][:20])
    res = sweep_lib.run_sweep(sweep_config(sweep_assets), out, cell_metrics=synthetic_surface, progress=False)
    assert res['evaluated'] == 1 and cells_by_key(sweep_cells(out)).keys() == cells_by_key(wider['cells']).keys()
    assert len(sweep_cells(out)) == 18


def test_fixed_network_and_guide_from_the_same_run_earlier(sweep_assets, tmp_path):
    # The "reduce training only" ablation: the guide is the same run at kimg 1; the main network a fixed file.
    fixed = tmp_path / 'fixed.safetensors'
    save_network(fixed, tiny_sweep_net(5, 8), StandardRGBEncoder())
    net = sweep_source.file_source(str(fixed), '--net')
    gnet = sweep_source.snapshot_source(sweep_assets['main'], 1, [0.05, 0.1], '--gnet')
    seen = []
    config = sweep_lib.SweepConfig(net, gnet, [2.0], ['fid'], 4, ref_name='synthetic')
    assert config.shape == (1, 2, 1, 1, 1) and config.planned_reconstructions() == (0, 2)
    result = sweep_lib.run_sweep(config, tmp_path / 'out', progress=False,
                                 cell_metrics=lambda cell, n, g: seen.append((n, g)) or {'fid': cell['gnet_std']})
    assert result['counter'] == {'loads': 1, 'reconstructions': 2, 'batches': 1}
    assert [c['net_std'] for c in result['cells']] == [None, None]
    assert result['cells'][0]['net'] == {'file': str(fixed)}
    assert result['cells'][0]['gnet']['inputs'] == ['network-snapshot-0000001-0.050.safetensors',
                                                    'network-snapshot-0000001-0.100.safetensors']
    # At kimg 1 the two stored lengths are reproduced exactly: coefficients (1, 0) and (0, 1).
    assert np.allclose(result['cells'][0]['gnet']['coefficients'], [1, 0], atol=1e-9)
    stored, _, _ = load_snapshot(os.path.join(sweep_assets['main'], 'network-snapshot-0000001-0.100.safetensors'))
    for a, b in zip(seen[1][1].parameters(), stored.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def _rule_surface(cell, net, gnet):
    """synthetic_surface plus a term per rule and interval: apg:eta=0 better, the interval (0.5, inf] better still."""
    return {'fid': synthetic_surface(cell, net, gnet)['fid'] + (0 if cell['rule'].startswith('apg') else 0.5)
            + (0 if cell['interval'] == 'sigma:0.5,inf' else 0.25)}


def test_rule_and_interval_axes_resume_and_descent(sweep_assets, tmp_path):
    out = tmp_path / 'out'
    base = dict(net_stds=(0.05, 0.07, 0.09), gnet_stds=(0.05, 0.08), guidances=(1.5, 2.0, 2.5))

    def config(rules, intervals=None, **kw):
        c = sweep_config(sweep_assets, **dict(base, **kw))
        return sweep_lib.SweepConfig(c.net, c.gnet, c.guidances, ['fid'], 4, batch=2, search=c.search, rules=rules,
                                     guidance_interval=intervals, ref_name='synthetic')

    first = sweep_lib.run_sweep(config(['lerp']), out, cell_metrics=_rule_surface, progress=False)
    assert first['evaluated'] == 18 and {(c['rule'], c['interval']) for c in sweep_cells(out)} == {('lerp', None)}
    # A second rule adds its cells only; the spec is canonical ('apg:eta=0' = 'apg:eta=0.0,momentum=0').
    more = sweep_lib.run_sweep(config(['lerp', 'apg:eta=0.0,momentum=0']), out, cell_metrics=_rule_surface,
                               progress=False)
    assert more['evaluated'] == 18 and more['counter']['reconstructions'] == 3 + 2
    assert {c['rule'] for c in sweep_cells(out)} == {'lerp', 'apg:eta=0,momentum=0,threshold=0'}
    # Dropping a rule or reordering computes nothing; an interval axis adds cells per interval.
    again = sweep_lib.run_sweep(config(['apg:eta=0']), out, cell_metrics=_rule_surface, progress=False)
    assert again['evaluated'] == 0 and again['counter'] == {} and len(again['cells']) == 18
    widened = sweep_lib.run_sweep(config(['apg:eta=0', 'lerp'], [(0.5, math.inf), (0.0, math.inf)]), out,
                                  cell_metrics=_rule_surface, progress=False)
    assert widened['evaluated'] == 2 * 36 and len(sweep_cells(out)) == 36 + 72
    doc = json.loads((out / 'sweep.json').read_text())
    assert doc['rule'] == ['apg:eta=0,momentum=0,threshold=0', 'lerp']
    assert doc['interval'] == ['sigma:0.5,inf', 'sigma:0.0,inf'] and '--guidance-interval' not in doc['fixed']
    best_grid = min(widened['cells'], key=lambda r: r['fid'])
    assert (best_grid['rule'], best_grid['interval']) == ('apg:eta=0,momentum=0,threshold=0', 'sigma:0.5,inf')
    # The coordinate search over five axes (rule and interval categorical) finds the same optimum.
    desc = sweep_lib.run_sweep(config(['lerp', 'apg:eta=0'], [(0.0, math.inf), (0.5, math.inf)], search='descent'),
                               tmp_path / 'desc', cell_metrics=_rule_surface, progress=False)
    assert desc['descent']['cell'] == sweep_lib.cell_key(best_grid['net_std'], best_grid['gnet_std'],
                                                         best_grid['guidance'], best_grid['rule'],
                                                         best_grid['interval'])
    assert desc['descent']['visited'] < 72 // 2


def test_cells_written_before_the_rule_axis_mean_lerp_and_their_interval(sweep_assets, tmp_path):
    out = tmp_path / 'old'
    interval = (0.5, math.inf)
    c = sweep_config(sweep_assets)
    sweep_lib.run_sweep(sweep_lib.SweepConfig(c.net, c.gnet, c.guidances, ['fid'], 4, batch=2, ref_name='synthetic',
                                              guidance_interval=interval), out, cell_metrics=_rule_surface,
                        progress=False)
    # Make it look like a folder of the earlier format: no rule/interval in the cells, the interval a fixed setting.
    lines = [{k: v for k, v in rec.items() if k not in ('rule', 'interval')} for rec in sweep_cells(out)]
    (out / 'cells.jsonl').write_text(''.join(json.dumps(rec) + '\n' for rec in lines))
    doc = json.loads((out / 'sweep.json').read_text())
    for key in ('rule', 'interval', 'cell_defaults'):
        del doc[key]
    doc['fixed'].update({'--guidance-interval': list(interval), '--guidance-interval-steps': None})
    (out / 'sweep.json').write_text(json.dumps(doc))

    def config(intervals, rules=('lerp',)):
        return sweep_lib.SweepConfig(c.net, c.gnet, c.guidances, ['fid'], 4, batch=2, ref_name='synthetic',
                                     guidance_interval=intervals, rules=rules)

    same = sweep_lib.run_sweep(config(interval), out, cell_metrics=_rule_surface, progress=False)
    assert same['evaluated'] == 0 and len(same['cells']) == 18
    assert all(r['rule'] == 'lerp' and r['interval'] == 'sigma:0.5,inf' for r in same['cells'])
    # The old cells keep that meaning once sweep.json is in the new format; no interval = every step: new cells.
    assert json.loads((out / 'sweep.json').read_text())['cell_defaults'] == {'rule': 'lerp', 'interval': 'sigma:0.5,inf'}
    other = sweep_lib.run_sweep(config(None, rules=('lerp', 'rescale:phi=0.7')), out, cell_metrics=_rule_surface,
                                progress=False)
    assert other['evaluated'] == 36 and len(sweep_cells(out)) == 18 + 36


def test_self_guide_axis_perturbs_each_main_network(sweep_assets, tmp_path):
    net = sweep_source.snapshot_source(sweep_assets['attn'], None, [0.05, 0.09], '--net')
    gnet = sweep_source.self_source('self:pag', '--gnet')
    config = sweep_lib.SweepConfig(net, gnet, [1.0, 2.0], ['fid'], 4, ref_name='synthetic', rules=['lerp', 'apg:eta=0'])
    assert config.shape == (2, 1, 2, 2, 1) and config.memory_bound() == (2, 0)
    assert config.planned_reconstructions() == (2, 0)
    sweep_lib.preflight(config, 'cpu')
    seen = []

    def metric(cell, n, g):
        seen.append((cell['net_std'], n, g))
        return {'fid': cell['guidance'] + (cell['rule'] == 'lerp')}

    out = tmp_path / 'out'
    result = sweep_lib.run_sweep(config, out, cell_metrics=metric, progress=False)
    assert result['counter'] == {'reconstructions': 2, 'batches': 1} and len(result['cells']) == 8
    for _, n, g in seen:  # the guide is the cell's own main network, perturbed: no second copy
        assert g.net is n and str(g.spec) == 'self:pag' and len(g.blocks) > 0
    assert {id(n) for _, n, _ in seen} == {id(n) for std, n, _ in seen if std == 0.05} | \
        {id(n) for std, n, _ in seen if std == 0.09} and len({id(n) for _, n, _ in seen}) == 2
    assert result['cells'][0]['gnet'] == {'self': 'self:pag'} and result['cells'][0]['gnet_std'] is None
    # Another guide changes what every cell means: refused, naming the flag.
    with pytest.raises(sweep_lib.SweepError, match='--gnet-dir/--gnet'):
        sweep_lib.run_sweep(sweep_lib.SweepConfig(net, sweep_source.self_source('self:skip=enc.8x8_block0', '--gnet'),
                                                  [1.0], ['fid'], 4, ref_name='synthetic'), out, cell_metrics=metric,
                            progress=False)
    # A self guide whose blocks the network lacks is refused before any cell.
    bad = sweep_lib.SweepConfig(net, sweep_source.self_source('self:pag=enc.8x8_nope', '--gnet'), [2.0], ['fid'], 4)
    with pytest.raises(sweep_lib.SweepError, match="--gnet self:pag=enc.8x8_nope: .*'enc.8x8_nope'"):
        sweep_lib.preflight(bad, 'cpu')


# ----------------------------------------------------------------------------------------------------
# Command line.

def test_bad_input_one_line_before_any_work(sweep_assets, tmp_path):
    out = tmp_path / 'out'
    empty = tmp_path / 'empty'
    empty.mkdir()

    def run(*replace, drop=(), extra=()):
        args = sweep_args(sweep_assets, out, extra)
        for flag, value in zip(replace[::2], replace[1::2]):
            args[args.index(flag) + 1] = value
        for flag in drop:
            i = args.index(flag)
            del args[i:i + 2]
        return _invoke(calculate_metrics.cli, args)

    _one_line_error(run('--net-dir', str(empty)), '--net-dir', 'no snapshots')
    _one_line_error(run('--gnet-kimg', '7'), '--gnet-kimg 7', 'kimg [1, 2, 3]')
    _one_line_error(run('--net-std', '0.05,0.4'), '--net-std', '0.4')
    _one_line_error(run('--gnet-std', ','), '--gnet-std', 'at least one value')
    _one_line_error(run('--guidance', ''), '--guidance')
    _one_line_error(run('--ref', sweep_assets['ref_fid']), 'no fd_dinov2 statistics')
    _one_line_error(run(extra=['--guidance-interval', '3,1']), '--guidance-interval')
    _one_line_error(run('--net-dir', sweep_assets['main'] + '-missing'), '--net-dir', 'not a folder')
    res = _invoke(calculate_metrics.cli, sweep_args(sweep_assets, out) + ['--net', sweep_assets['main']])
    assert res.exit_code != 0 and 'exactly one of --net-dir and --net' in res.output
    # A guide folder of another network class (here: a different resolution) than the main one.
    other = tmp_path / 'other'
    other.mkdir()
    save_network(other / 'network-snapshot-0000001-0.050.safetensors',
                 build_network(dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=4,
                                    channel_mult=[1], num_blocks=1, attn_resolutions=[])),
                 StandardRGBEncoder(), kimg=1, ema_std=0.05, nimg=1024)
    _one_line_error(run('--gnet-dir', str(other), '--gnet-std', '0.05', drop=['--gnet-kimg']), '--gnet')
    # A folder mixing two different networks.
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    for name in sorted(os.listdir(sweep_assets['main']))[:2]:
        os.link(os.path.join(sweep_assets['main'], name), mixed / name)
    os.link(other / 'network-snapshot-0000001-0.050.safetensors', mixed / 'network-snapshot-0000003-0.050.safetensors')
    _one_line_error(run('--net-dir', str(mixed)), '--net-dir', 'mismatched')
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_cells_equal_reconstruct_phema_plus_gen_and_outputs(sweep_assets, tmp_path):
    out = tmp_path / 'sweep'
    res = _invoke(calculate_metrics.cli, sweep_args(sweep_assets, out, ['--save-best']))
    assert res.exit_code == 0, res.output
    cells = sweep_cells(out)
    assert len(cells) == 8 and len(cells_by_key(cells)) == 8
    # Two cells through the published route: write the networks, then `gen` on the files.
    recon = tmp_path / 'recon'
    for indir, stds, kimg in ((sweep_assets['main'], '0.06,0.09', []), (sweep_assets['guide'], '0.05,0.08', ['--outkimg', 2])):
        r = _invoke(reconstruct_phema.main, ['--indir', indir, '--outdir', recon / os.path.basename(indir),
                                             '--outstd', stds, *kimg])
        assert r.exit_code == 0, r.output
    by_key = cells_by_key(cells)
    for net_std, gnet_std, w in ((0.06, 0.05, 1.5), (0.09, 0.08, 2.5)):
        net = recon / 'main' / f'phema-0000003-{net_std:.3f}.safetensors'
        gnet = recon / 'guide' / f'phema-0000002-{gnet_std:.3f}.safetensors'
        r = _invoke(calculate_metrics.cli, ['gen', '--net', net, '--gnet', gnet, '--guidance', w,
                                            '--ref', sweep_assets['ref'], '--metrics', 'fid,fd_dinov2', '--num', 4,
                                            '--steps', 2, '--batch', 2, '--out', tmp_path / 'gen.json',
                                            *detector_flags(sweep_assets)])
        assert r.exit_code == 0, r.output
        run = json.loads((tmp_path / 'gen.json').read_text())['runs'][0]
        cell = by_key[(net_std, gnet_std, w, 'lerp', None)]
        for m in ('fid', 'fd_dinov2'):  # same networks, images and features: equal to float32 summation
            assert cell[m] == pytest.approx(run[m], rel=1e-5, abs=1e-6), (m, cell[m], run[m])
    # sweep.json, table, figures, and the best networks equal to the reconstructions.
    doc = json.loads((out / 'sweep.json').read_text())
    best = min(cells, key=lambda c: c['fid'])
    assert doc['best']['fid'] == best and doc['fixed']['--num'] == 4
    assert 'net_std' in res.output and 'Best fid' in res.output and 'Memory bound: 2 main + 2 guide' in res.output
    assert 'Reconstructions (full grid): 2 main + 2 guide = 4' in res.output
    for kind in ('heatmap', 'guidance'):
        for m in ('fid', 'fd_dinov2'):
            assert (out / f'sweep-{m}-{kind}.png').stat().st_size > 1000
    saved, _, _ = load_snapshot(out / f'best-net-{best["net_std"]:.3f}.safetensors')
    ref_net, _, _ = load_snapshot(recon / 'main' / f'phema-0000003-{best["net_std"]:.3f}.safetensors')
    for (k, a), b in zip(saved.state_dict().items(), ref_net.state_dict().values()):
        assert torch.equal(a, b), k
    assert 'python generate_images.py --net' in res.output and 'calculate_metrics.py gen' in res.output


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _values(cells):
    return {k: (c['fid'], c['fd_dinov2']) for k, c in cells_by_key(cells).items()}


def _killed_after_three_cells(command, outdir, env):
    """Run the sweep `command`, SIGKILL it once cells.jsonl holds 3 lines; the complete lines it left
    (the kill must land mid-sweep: fewer than the 8 cells of the grid)."""
    p = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (outdir / 'cells.jsonl').exists() and len((outdir / 'cells.jsonl').read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = [line for line in (outdir / 'cells.jsonl').read_text().splitlines(keepends=True) if line.endswith('\n')]
    assert 3 <= len(done) < 8, 'the kill must land during the sweep'
    return done


@pytest.mark.slow
def test_kill9_then_rerun_equals_uninterrupted(sweep_assets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    cmd = [sys.executable, os.path.join(REPO, 'calculate_metrics.py')]
    slower = ['--steps', '6']  # (the last value of a flag wins) cells slow enough for the kill to land mid-sweep
    proc = subprocess.run(cmd + sweep_args(sweep_assets, whole, slower), env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = _killed_after_three_cells(cmd + sweep_args(sweep_assets, cut, slower), cut, env)
    proc = subprocess.run(cmd + sweep_args(sweep_assets, cut, slower), env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = (cut / 'cells.jsonl').read_text().splitlines(keepends=True)
    assert after[:len(done)] == done  # finished cells kept as they were
    assert json.loads((cut / 'sweep.json').read_text())['result']['evaluated_this_run'] == 8 - len(done)
    assert _values(sweep_cells(cut)) == _values(sweep_cells(whole))  # same process count and threads: bitwise equal
    assert len(after) == 8


@pytest.mark.slow
def test_torchrun_two_processes_give_same_cells(sweep_assets, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one, two = tmp_path / 'one', tmp_path / 'two'
    res = _invoke(calculate_metrics.cli, sweep_args(sweep_assets, one))
    assert res.exit_code == 0, res.output
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           os.path.join(REPO, 'calculate_metrics.py')] + sweep_args(sweep_assets, two)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _values(sweep_cells(one)), _values(sweep_cells(two))
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:  # each rank samples a batch of 2 as one process does: features equal up to summation order
        for x, y in zip(a[k], b[k]):
            assert y == pytest.approx(x, rel=1e-5, abs=1e-6), k


def test_rule_and_self_guide_flags_refused_in_one_line(sweep_assets, tmp_path):
    out = tmp_path / 'out'
    for flag, value, fragment in (('--guidance-rule', 'apg:foo=1', 'unknown key'),
                                  ('--guidance-rule', 'apg:eta=nan', 'finite'),
                                  ('--guidance-rule', 'rescale', 'needs phi'),
                                  ('--gnet', 'self:bogus', 'unknown self guide'),
                                  ('--gnet', 'self:skip=dec.8x8_nope', 'dec.8x8_nope')):
        args = self_sweep_args(sweep_assets, out)
        args[args.index(flag) + 1] = value
        res = _invoke(calculate_metrics.cli, args)
        _one_line_error(res, flag if flag == '--guidance-rule' else '--gnet', fragment)
        assert res.exit_code in (1, 2) and (flag != '--guidance-rule' or res.exit_code == 2)
    res = _invoke(calculate_metrics.cli, self_sweep_args(sweep_assets, out, ['--guidance-interval-steps', '2,9']))
    _one_line_error(res, '--guidance-interval-steps', '2,9')
    assert not out.exists()


@pytest.mark.slow
def test_kill9_two_rules_and_a_self_guide(sweep_assets, tmp_path):
    """Two rules x a self guide (PAG of each main network): killed with SIGKILL mid-sweep, the rerun keeps every
    finished cell, computes only the others, and equals an uninterrupted sweep."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    cmd = [sys.executable, os.path.join(REPO, 'calculate_metrics.py')]
    proc = subprocess.run(cmd + self_sweep_args(sweep_assets, whole), env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'self:pag, a perturbation of each main network' in proc.stdout and '2 rules' in proc.stdout
    cells = sweep_cells(whole)
    assert len(cells) == 8 and {c['rule'] for c in cells} == {'lerp', 'apg:eta=0,momentum=0,threshold=0'}
    assert all(c['gnet'] == {'self': 'self:pag'} for c in cells)
    done = _killed_after_three_cells(cmd + self_sweep_args(sweep_assets, cut), cut, env)
    proc = subprocess.run(cmd + self_sweep_args(sweep_assets, cut), env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = (cut / 'cells.jsonl').read_text().splitlines(keepends=True)
    assert after[:len(done)] == done and len(after) == 8
    assert json.loads((cut / 'sweep.json').read_text())['result']['evaluated_this_run'] == 8 - len(done)
    assert _values(sweep_cells(cut)) == _values(cells)  # same process count and threads: bitwise equal
    # apg:eta=0 differs from lerp at w != 1; the figures name the rules.
    by = cells_by_key(cells)
    assert by[(0.06, None, 2.5, 'lerp', None)]['fid'] != by[(0.06, None, 2.5, 'apg:eta=0,momentum=0,threshold=0', None)]['fid']
    assert (whole / 'sweep-fid-heatmap.png').stat().st_size > 1000


def test_figures_skipped_in_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    from edm2.sweep import report as sweep_report
    records = [dict(net_std=0.05, gnet_std=0.05, guidance=w, fid=3 - w) for w in (1.0, 2.0)]
    best = sweep_report.best_cells(records, ['fid'])
    assert best['fid']['guidance'] == 2.0
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib now raises ImportError
    assert sweep_report.figures(str(tmp_path), records, ['fid'], [0.05], [0.05], best) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and 'matplotlib' in out[0]
    assert os.listdir(tmp_path) == []


def test_record_key_reads_rules_in_their_canonical_spelling():
    """A cells.jsonl line written before rule specs were normalised ('momentum=-0', '1.0') keys the same cell as
    today's spec of that rule, so a resumed sweep does not compute it again; text that is no rule keeps its own
    spelling (its cell matches nothing and is computed again)."""
    from edm2.guidance_rules import parse_rule
    from edm2.sweep.log import cell_key, record_key
    record = dict(net_std=0.1, gnet_std=0.05, guidance=2.0)
    today = cell_key(0.1, 0.05, 2.0, parse_rule('apg:eta=1,momentum=0'))
    for old in ('apg:eta=1.0,momentum=-0', 'apg:momentum=-0.0,eta=1,threshold=0'):
        assert record_key(dict(record, rule=old)) == today
    assert record_key(dict(record, rule='apg:momentum=-0'))[3] != 'apg:momentum=-0'
    assert record_key(dict(record, rule='no-such-rule'))[3] == 'no-such-rule'
    assert record_key(dict(record, rule=7))[3] == '7'


@pytest.mark.slow
def test_precision_is_a_fixed_setting_of_the_sweep(sweep_assets, tmp_path):
    """--precision bf16 is recorded with the sweep's fixed settings; resuming in another precision is refused
    (its cells would not be comparable), and the bf16 cells differ from float32 ones."""
    one = ['--net-std', '0.06', '--gnet-std', '0.05', '--guidance', '2']

    def sweep(out, *flags):
        args = sweep_args(sweep_assets, out)
        for flag, value in zip(one[::2], one[1::2]):
            args[args.index(flag) + 1] = value
        return _invoke(calculate_metrics.cli, args + list(flags))

    bf16, fp32 = tmp_path / 'bf16', tmp_path / 'fp32'
    assert sweep(bf16, '--precision', 'bf16').exit_code == 0
    assert sweep(fp32).exit_code == 0
    with open(bf16 / 'sweep.json') as f:
        assert json.load(f)['fixed']['--precision'] == 'bf16'
    assert sweep_cells(bf16)[0]['fid'] != sweep_cells(fp32)[0]['fid']
    res = sweep(bf16, '--precision', 'fp32')
    assert res.exit_code != 0 and '--precision' in res.output
