"""Watching a run, piece by piece: per-σ loss buckets against a direct computation, grid layout and classes,
the loggers' steps on resume and their failures (a fake W&B module; TensorBoard's own reader), the flags'
one-line errors, and the curves."""

import json
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2 import plots
from edm2.commands import train_edm2
from edm2.training import grids, loss_buckets
from edm2.training.loggers import Loggers, cut_event_files
from edm2.training.options import TrainingError, TrainingOptions


# ----------------------------------------------------------------------------------------------------
# Per-σ loss.

def test_loss_buckets_equal_a_direct_computation_and_sum_to_the_mean():
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(64, 3, 4, 4, generator=gen)
    log_sigma = torch.randn(64, 1, 1, 1, generator=gen) * 2
    log_sigma[:3] = torch.tensor([-3.0, 0.0, 3.0]).reshape(3, 1, 1, 1)  # on the edges: the lower bucket
    sums = loss_buckets.new_sums('cpu')
    image_losses = loss.flatten(1).mean(1).double()
    for half in (slice(0, 40), slice(40, 64)):  # accumulated over two rounds
        loss_buckets.add(sums, image_losses[half], log_sigma[half])
    rec = loss_buckets.record(sums)
    ls, per_image = log_sigma.flatten().numpy(), image_losses.numpy()
    bounds = [-np.inf, *loss_buckets.EDGES, np.inf]
    for b in range(loss_buckets.NUM_BUCKETS):
        inside = (ls > bounds[b]) & (ls <= bounds[b + 1])
        assert rec['loss_sigma_n'][b] == inside.sum()
        if inside.any():
            assert rec['loss_sigma'][b] == pytest.approx(per_image[inside].mean(), rel=1e-12)
        else:
            assert rec['loss_sigma'][b] is None
    assert rec['loss_sigma_n'][2:5] != [0, 0, 0] and sum(rec['loss_sigma_n']) == 64
    weighted = sum(m * n for m, n in zip(rec['loss_sigma'], rec['loss_sigma_n']) if n) / 64
    assert weighted == pytest.approx(float(image_losses.mean()), rel=1e-12)
    assert weighted == pytest.approx(float(loss.double().mean()), rel=1e-6)  # per-image means in float32
    assert rec['loss_sigma_edges'] == list(loss_buckets.EDGES)
    assert loss_buckets.bucket_names()[0] == 'ln_sigma<=-3' and loss_buckets.bucket_names()[-1] == 'ln_sigma>3'


# ----------------------------------------------------------------------------------------------------
# Grids.

def test_grid_classes_are_spread_and_rows_laid_out_with_gaps():
    assert grids.column_classes(4, 3) == [0, 0, 1, 2]
    assert grids.column_classes(8, 1000) == [0, 125, 250, 375, 500, 625, 750, 875]
    assert grids.column_classes(5, 0) is None
    rows = [torch.full((3, 3, 4, 5), r * 10 + 1, dtype=torch.uint8) for r in range(2)]
    rows[1][2, 0, 1, 2] = 99
    sheet = grids.assemble(rows)
    g = grids.GAP
    assert sheet.shape == (2 * 4 + g, 3 * 5 + 2 * g, 3)
    assert (sheet[:4, :5] == 1).all() and (sheet[4:4 + g] == 255).all() and (sheet[:, 5:5 + g] == 255).all()
    assert sheet[4 + g + 1, 2 * (5 + g) + 2, 0] == 99 and sheet.dtype == np.uint8
    assert grids.grid_file_name(2_000_999) == 'grid-0002000.png'


# ----------------------------------------------------------------------------------------------------
# Loggers.

class FakeWandB(types.ModuleType):
    """Records what the adapter asks of the wandb package."""

    def __init__(self, fail_init=False, fail_log_after=None):
        super().__init__('wandb')
        self.inits, self.logged, self.finished = [], [], 0
        self.fail_init, self.fail_log_after = fail_init, fail_log_after
        fake = self

        class Run:
            def log(self, data, step):
                if fake.fail_log_after is not None and len(fake.logged) >= fake.fail_log_after:
                    raise ConnectionError('the server went away')
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1
        self.Run = Run

    def init(self, **kwargs):
        if self.fail_init:
            raise RuntimeError('api key missing')
        self.inits.append(kwargs)
        return self.Run()

    def Image(self, array):
        return ('image', array.shape)


def _opts(tmp_path, **kw):
    return TrainingOptions(outdir=str(tmp_path), data=str(tmp_path), duration=1, **kw)


def test_wandb_adapter_resumes_the_run_and_never_logs_a_step_twice(tmp_path, monkeypatch):
    fake = FakeWandB()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    opts = _opts(tmp_path, logger=['wandb'], wandb_project='proj', wandb_group='g')
    log = []
    loggers = Loggers(opts, {'lr': 0.01}, 0, log.append)
    loggers.scalars({'loss': 1.0, 'lr': 0.01}, 1000)
    loggers.scalars({'loss': 2.0}, 1500)       # the same kimg: dropped
    loggers.scalars({'loss': 3.0, 'x': None}, 2000)
    loggers.image('grid', np.zeros((4, 4, 3), np.uint8), 2000)
    loggers.scalars({'loss': 4.0}, 1000)       # back in time: dropped
    loggers.close()
    first = fake.inits[0]
    run_id = (tmp_path / 'wandb-run-id.txt').read_text().strip()
    assert first['id'] == run_id and first['resume'] == 'allow' and first['project'] == 'proj'
    assert first['group'] == 'g' and first['name'] == tmp_path.name and first['config'] == {'lr': 0.01}
    assert fake.logged == [(1, {'loss': 1.0, 'lr': 0.01}), (3 - 1, {'loss': 3.0}), (2, {'grid': ('image', (4, 4, 3))})]
    assert fake.finished == 1 and not log
    # Resumed at 1008 images: the same run id; steps up to kimg 1 were logged by the first session.
    loggers = Loggers(opts, {}, 1008, log.append)
    loggers.scalars({'loss': 5.0}, 1500)
    loggers.scalars({'loss': 6.0}, 2500)
    assert fake.inits[1]['id'] == run_id and fake.logged[-1] == (2, {'loss': 6.0}) and len(fake.logged) == 4
    # A fresh start in the same folder (no checkpoint) is a new W&B run.
    Loggers(opts, {}, 0, log.append).scalars({'loss': 7.0}, 0)
    assert fake.inits[2]['id'] != run_id and fake.logged[-1] == (0, {'loss': 7.0})


def test_a_logger_failing_mid_run_warns_once_and_goes_quiet(tmp_path, monkeypatch):
    fake = FakeWandB(fail_log_after=1)
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    log = []
    loggers = Loggers(_opts(tmp_path, logger=['wandb']), {}, 0, log.append)
    for k in range(1, 5):
        loggers.scalars({'loss': float(k)}, k * 1000)
    assert len(fake.logged) == 1 and len(log) == 1
    assert log[0].startswith('Warning: --logger wandb failed') and 'ConnectionError: the server went away' in log[0]
    assert '\n' not in log[0] and fake.finished == 1


def test_a_logger_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', FakeWandB(fail_init=True))
    with pytest.raises(TrainingError, match=r'^--logger wandb: could not start: RuntimeError: api key missing') as e:
        Loggers(_opts(tmp_path, logger=['wandb']), {}, 0, print)
    assert '\n' not in str(e.value)
    monkeypatch.setitem(sys.modules, 'wandb', None)  # not installed
    with pytest.raises(TrainingError, match=r'needs the wandb package: pip install "edm2\[wandb\]"'):
        Loggers(_opts(tmp_path, logger=['wandb']), {}, 0, print)
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(TrainingError, match=r'needs the tensorboard package: pip install "edm2\[tensorboard\]"'):
        Loggers(_opts(tmp_path, logger=['tensorboard']), {}, 0, print)


def test_tensorboard_event_files_are_cut_back_to_the_resumed_step(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    opts = _opts(tmp_path, logger=['tensorboard'])
    loggers = Loggers(opts, {'a': 1}, 0, print)
    for kimg in range(6):
        loggers.scalars({'loss': float(kimg)}, kimg * 1000)
    loggers.close()
    (path,) = [p for p in tmp_path.iterdir() if 'tfevents' in p.name]
    cut_event_files(tmp_path, 2)
    steps = [(v.tag, e.step, v.tensor.float_val[0] if v.HasField('tensor') else v.simple_value)
             for e in EventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == 'loss']
    assert steps == [('loss', k, float(k)) for k in range(3)]
    assert [p.name for p in tmp_path.iterdir() if 'tfevents' in p.name] == [path.name]  # replaced in place
    # TensorBoard's accumulator still sees them as scalars (the records are kept as they were written).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(k, float(k)) for k in range(3)]
    Loggers(opts, {}, 0, print).close()  # a fresh start: the events of the earlier start are gone
    (new,) = [p for p in tmp_path.iterdir() if 'tfevents' in p.name]
    assert new != path and not any(v.tag == 'loss' for e in EventFileLoader(str(new)).Load() for v in e.summary.value)


# ----------------------------------------------------------------------------------------------------
# Flags: one line each, before any work.

def _images(root, n=4):
    root.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(n):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f'{i}.png')
    return root


@pytest.mark.parametrize('extra, fragment', [
    (['--eval', '2000'], '--eval needs --eval-ref'),
    (['--eval', '3000', '--eval-ref', 'r.pkl', '--snapshot', '2000'], '--eval 3000: must be a multiple of --snapshot'),
    (['--grid', '500'], '--grid 500: must be 0 (off) or at least 1000'),
    (['--grid', '1000', '--grid-gnet', 'missing.pkl'], '--grid-gnet missing.pkl: no such file'),
    (['--eval-metrics', 'fid,is'], "unknown metric 'is'"),
    (['--grid-seeds', '3-1'], 'empty range'),
    (['--logger', 'mlflow'], "'mlflow' is not one of"),
    (['--eval-stds', '0.5'], '--eval-stds'),
    (['--eval', '2000', '--eval-ref', 'missing-ref.pkl', '--snapshot', '1000'], '--eval:'),
])
def test_bad_watch_flags_are_one_line_before_any_work(tmp_path, extra, fragment):
    data = _images(tmp_path / 'data')
    run = tmp_path / 'run'
    r = CliRunner().invoke(train_edm2.main, ['--outdir', str(run), '--data', str(data), '--cond', '0', '--duration',
                                             '64', '--batch', '8', '--channels', '8', '--channel-mult', '1',
                                             '--num-blocks', '1', '--attn-res', '', '--device', 'cpu', *extra])
    assert r.exit_code != 0 and 'Traceback' not in r.output, r.output
    lines = [line for line in r.output.splitlines() if 'Error' in line]
    assert len(lines) == 1 and fragment in lines[0], r.output
    assert not (run / 'stats.jsonl').exists() and not list(run.glob('training-state-*'))


# ----------------------------------------------------------------------------------------------------
# Curves.

def _fake_run(folder, offset):
    folder.mkdir(parents=True)
    edges = list(loss_buckets.EDGES)
    stats = [dict(kimg=k, nimg=k * 1000, loss=1 / (k + offset), loss_sigma=[None] + [0.1 * b + k for b in range(7)],
                  loss_sigma_n=[0] + [5] * 7, loss_sigma_edges=edges) for k in range(1, 6)]
    (folder / 'stats.jsonl').write_text(''.join(json.dumps(s) + '\n' for s in stats) + '{"kimg": 6, "lo')
    metrics = [dict(kimg=k, nimg=k * 1000, ema_std=s, metric='fid', value=10 / k + s) for k in (2, 4) for s in (0.05, 0.1)]
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in metrics))
    return folder


def test_curves_of_two_runs(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    a, b = _fake_run(tmp_path / 'x' / 'run', 1), _fake_run(tmp_path / 'y' / 'run', 2)
    assert len(plots.read_run(a)['stats']) == 5  # the line cut short is skipped
    assert plots.run_labels([str(a), str(b)]) == [str(a), str(b)]
    out = tmp_path / 'curves.png'
    assert plots.main([str(a), str(b), '--out', str(out)]) == 0
    image = np.asarray(PIL.Image.open(out))
    assert image.shape[:2] == (420, 1500) and image.std() > 0
    assert plots.main([str(tmp_path / 'nothing'), '--out', str(out)]) == 1
    assert capsys.readouterr().err.strip() == f'Error: {tmp_path / "nothing"}: no such folder'
    (tmp_path / 'empty').mkdir()
    assert plots.main([str(tmp_path / 'empty'), '--out', str(out)]) == 1
    assert 'no stats.jsonl or metrics.jsonl lines' in capsys.readouterr().err


def test_curves_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    run = _fake_run(tmp_path / 'run', 1)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert plots.main([str(run), '--out', str(tmp_path / 'c.png')]) == 1
    assert capsys.readouterr().err.strip() == 'Error: drawing curves needs matplotlib: pip install "edm2[toy]"'


# ----------------------------------------------------------------------------------------------------
# Loggers inside a training run (a fake W&B module; W&B's own offline mode when it is installed).

def _train(tmp_path, *extra, duration=64):
    data = tmp_path / 'data'
    if not data.exists():
        _images(data)
    return CliRunner().invoke(train_edm2.main, [
        '--outdir', str(tmp_path / 'run'), '--data', str(data), '--cond', '0', '--duration', str(duration),
        '--batch', '8', '--channels', '8', '--channel-mult', '1', '--num-blocks', '1', '--attn-res', '',
        '--device', 'cpu', '--workers', '0', '--decay', '0', '--rampup', '0', '--status', '8', *extra])


def test_a_logger_that_cannot_start_stops_the_run_before_its_first_step(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', FakeWandB(fail_init=True))
    r = _train(tmp_path, '--logger', 'wandb')
    lines = [line for line in r.output.splitlines() if 'Error' in line]
    assert r.exit_code == 1 and lines == ['Error: --logger wandb: could not start: RuntimeError: api key missing']
    run = tmp_path / 'run'
    assert not (run / 'stats.jsonl').exists() and not list(run.glob('training-state-*'))


@pytest.mark.slow
def test_a_logger_failing_mid_run_leaves_training_going(tmp_path, monkeypatch):
    fake = FakeWandB(fail_log_after=2)
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    r = _train(tmp_path, '--logger', 'wandb', '--status', '1000', duration=3000)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith('Warning:')]
    assert len(warnings) == 1 and 'ConnectionError' in warnings[0]
    assert [step for step, _ in fake.logged] == [1, 2]  # stats at kimg 1 and 2; kimg 3 failed
    assert json.loads((tmp_path / 'run' / 'stats.jsonl').read_text().splitlines()[-1])['nimg'] == 3000


@pytest.mark.slow
def test_wandb_offline_mode_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    for duration in (1000, 2000):
        r = _train(tmp_path, '--logger', 'wandb', '--status', '1000', duration=duration)
        assert r.exit_code == 0, r.output
    run = tmp_path / 'run'
    run_id = (run / 'wandb-run-id.txt').read_text().strip()
    sessions = sorted((run / 'wandb').glob('offline-run-*'))
    assert len(sessions) == 2 and all(s.name.endswith('-' + run_id) for s in sessions)
    assert all((s / f'run-{run_id}.wandb').stat().st_size > 0 for s in sessions)


# ----------------------------------------------------------------------------------------------------
# The progress bar: on an interactive console only; log.txt keeps the status lines alone.

@pytest.mark.parametrize('interactive', [True, False])
def test_progress_bar_with_eta_only_when_interactive(tmp_path, capsys, monkeypatch, interactive):
    from edm2.training import loop
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: interactive)
    opts = TrainingOptions(outdir=str(tmp_path / 'run'), data=str(_images(tmp_path / 'data')), cond=False,
                           duration=32, batch=8, channels=8, decay=0, rampup=0, status=16, snapshot=0, checkpoint=0,
                           workers=0, device='cpu', network=dict(channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    loop.training_loop(opts)
    captured = capsys.readouterr()
    bar = [line for line in captured.err.replace('\r', '\n').splitlines() if line.startswith('train:')]
    assert bool(bar) == interactive, captured.err
    if interactive:
        assert '32.0/32.0' in bar[-1] and '<00:00' in bar[-1]  # count and the remaining time (ETA)
    log = (tmp_path / 'run' / 'log.txt').read_text().splitlines()
    assert [line.split()[:2] for line in log if line.startswith('kimg')] == [['kimg', '0.016'], ['kimg', '0.032']]
    assert not any('train:' in line or '\r' in line for line in log)
    assert sum(line.startswith('kimg') for line in captured.out.splitlines()) == 2  # the console keeps them too


def test_stats_lines_hold_the_gradient_norm_and_images_per_second(tmp_path, monkeypatch):
    from edm2.training import loop
    norms, make = [], loop.adam

    def recording_adam(params, **kwargs):
        params = list(params)
        optimizer = make(params, **kwargs)
        step = optimizer.step

        def recorded_step(*a, **kw):  # the norm of the gradient the optimiser applies, computed directly
            norms.append(float(sum(p.grad.double().square().sum() for p in params if p.grad is not None) ** 0.5))
            return step(*a, **kw)
        optimizer.step = recorded_step
        return optimizer
    monkeypatch.setattr(loop, 'adam', recording_adam)
    r = _train(tmp_path, '--status', '16', duration=48)
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in (tmp_path / 'run' / 'stats.jsonl').read_text().splitlines()]
    assert len(norms) == 6 and [line['nimg'] for line in lines] == [16, 32, 48]
    for k, line in enumerate(lines):
        assert line['grad_norm'] == pytest.approx(np.mean(norms[2 * k:2 * k + 2]), rel=1e-5)
        assert line['images_per_s'] == pytest.approx(1000 / line['sec_per_kimg'], rel=1e-12)
