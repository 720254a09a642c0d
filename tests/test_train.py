"""Training: pure pieces (durations, lr schedule, sampler, loss), presets, and bad input (fast)."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2.commands import train_edm2
from edm2 import presets
from edm2.training import optimizer, options, stream
from edm2.training.loss import EDM2Loss


def test_parse_nimg_units():
    assert options.parse_nimg('2048Mi') == 2048 << 20
    assert options.parse_nimg('128Ki') == 128 << 10
    assert options.parse_nimg('10M') == 10_000_000
    assert options.parse_nimg('8192') == 8192 and options.parse_nimg(7) == 7
    for bad in ('12Xi', 'abc', '0.5'):
        with pytest.raises(ValueError):
            options.parse_nimg(bad)


def test_learning_rate_schedule():
    # EDM2 paper, Sec. 2.4: alpha_ref / sqrt(max(t/(t_ref B), 1)), times a linear ramp min(t/rampup, 1).
    B, ref, decay, ramp = 2048, 0.01, 70000, 10_000_000
    assert optimizer.learning_rate(0, B, ref, decay, ramp) == 0
    assert optimizer.learning_rate(ramp // 2, B, ref, decay, ramp) == pytest.approx(ref / 2, rel=1e-12)
    t = decay * B
    assert optimizer.learning_rate(t, B, ref, decay, ramp) == pytest.approx(ref, rel=1e-12)
    assert optimizer.learning_rate(4 * t, B, ref, decay, ramp) == pytest.approx(ref / 2, rel=1e-12)
    assert optimizer.learning_rate(123, B, ref, 0, 0) == ref


@pytest.mark.parametrize('world,batch_gpu', [(2, 4), (1, 2), (4, 1)])
def test_sampler_gives_each_step_the_same_images(world, batch_gpu):
    B, N = 8, 13
    single = stream.InfiniteSampler(N, B, B, seed=3)
    it = iter(single)
    ref = [[next(it) for _ in range(B)] for _ in range(5)]  # 5 steps of one process
    rounds = B // (world * batch_gpu)
    iters = [iter(stream.InfiniteSampler(N, B, batch_gpu, r, world, seed=3)) for r in range(world)]
    for step in range(5):
        got = []
        for a in range(rounds):
            for r in range(world):  # the row order a*W*b + r*b + j of the module doc
                got += [next(iters[r]) for _ in range(batch_gpu)]
        assert got == ref[step]
    # Every epoch is a permutation of the dataset; a sampler started at step 3 continues the stream.
    flat = sum(ref, [])
    assert sorted(flat[:N]) == list(range(N)) and sorted(flat[N:2 * N]) == list(range(N))
    late = iter(stream.InfiniteSampler(N, B, B, seed=3, start_step=3))
    assert [next(late) for _ in range(2 * B)] == flat[3 * B:5 * B]


class _FakeNet:
    """D(x) = y + delta, logvar = u: the loss must be lambda(sigma) e^-u delta^2 + u per element."""

    def __init__(self, y, delta, u):
        self.y, self.delta, self.u = y, delta, u
        self.seen = None

    def __call__(self, x, sigma, labels, return_logvar=False):
        self.seen = (x, sigma)
        return self.y + self.delta, torch.full_like(sigma, self.u)


def test_loss_matches_definition():
    y = torch.randn(4, 3, 2, 2)
    rnd, eps = torch.randn(4, 1, 1, 1), torch.randn(4, 3, 2, 2)
    fn = EDM2Loss(P_mean=-0.4, P_std=1.0)
    net = _FakeNet(y, 0.25, 0.7)
    loss = fn(net, y, None, rnd_normal=rnd, eps=eps)
    sigma = torch.exp(rnd * 1.0 - 0.4)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss, (lam / math.exp(0.7) * 0.0625 + 0.7).expand(4, 3, 2, 2), rtol=1e-6, atol=0)
    torch.testing.assert_close(net.seen[0], y + eps * sigma, rtol=0, atol=0)
    torch.testing.assert_close(net.seen[1], sigma, rtol=0, atol=0)


def test_presets_match_spec_table():
    table = {  # the EDM2 paper's table of training configurations (ImageNet-512 and ImageNet-64)
        'edm2-img512-xxs': (64, '2048Mi', 0.0170, 70000, 0.00, -0.4, 1.0),
        'edm2-img512-xs': (128, '2048Mi', 0.0120, 70000, 0.00, -0.4, 1.0),
        'edm2-img512-s': (192, '2048Mi', 0.0100, 70000, 0.00, -0.4, 1.0),
        'edm2-img512-m': (256, '2048Mi', 0.0090, 70000, 0.10, -0.4, 1.0),
        'edm2-img512-l': (320, '1792Mi', 0.0080, 70000, 0.10, -0.4, 1.0),
        'edm2-img512-xl': (384, '1280Mi', 0.0070, 70000, 0.10, -0.4, 1.0),
        'edm2-img512-xxl': (448, '896Mi', 0.0065, 70000, 0.10, -0.4, 1.0),
        'edm2-img64-xs': (128, '1024Mi', 0.0120, 35000, 0.00, -0.8, 1.6),
        'edm2-img64-s': (192, '1024Mi', 0.0100, 35000, 0.00, -0.8, 1.6),
        'edm2-img64-m': (256, '2048Mi', 0.0090, 35000, 0.10, -0.8, 1.6),
        'edm2-img64-l': (320, '1024Mi', 0.0080, 35000, 0.10, -0.8, 1.6),
        'edm2-img64-xl': (384, '640Mi', 0.0070, 35000, 0.10, -0.8, 1.6),
    }
    assert set(presets.load('train')) == set(table)
    for name, (ch, dur, lr, decay, dropout, pm, ps) in table.items():
        row = presets.get('train', name)
        assert (row['channels'], row['duration'], row['lr'], row['decay'], row['dropout'], row['P_mean'],
                row['P_std'], row['batch']) == (ch, dur, lr, decay, dropout, pm, ps, 2048)


# ----------------------------------------------------------------------------------------------
# Command line: bad input gives one line and writes nothing.

def _png_dataset(root, n=4, res=8, labels=True):
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        name = f'img{i:08d}.png'
        PIL.Image.fromarray(np.full((res, res, 3), 40 * i, np.uint8)).save(root / name)
        entries.append([name, i % 2])
    (root / 'dataset.json').write_text(json.dumps({'labels': entries if labels else None}))
    return root


TINY = ['--channels', '8', '--channel-mult', '1,2', '--num-blocks', '1', '--attn-res', '', '--device', 'cpu',
        '--workers', '0', '--rampup', '0']


def _train(*args):
    return CliRunner().invoke(train_edm2.main, [str(a) for a in args], catch_exceptions=False)


def _fails(tmp_path, *args, match):
    out = tmp_path / 'run'
    r = _train('--outdir', out, *args)
    assert r.exit_code != 0, r.output
    errors = [line for line in r.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and match in errors[0] and 'Traceback' not in r.output, r.output
    assert not out.exists()


def test_bad_input_is_refused_before_any_output(tmp_path):
    ds = _png_dataset(tmp_path / 'ds')
    common = ['--duration', '64', *TINY]
    _fails(tmp_path, '--data', tmp_path / 'nope', *common, match='not found')
    (tmp_path / 'empty').mkdir()
    _fails(tmp_path, '--data', tmp_path / 'empty', *common, match='no PNG')
    unl = _png_dataset(tmp_path / 'unl', labels=False)
    _fails(tmp_path, '--data', unl, '--cond', '1', *common, match='has no class labels')
    _fails(tmp_path, '--data', ds, '--batch', '12', '--batch-gpu', '8', *common, match='not divisible')
    odd = _png_dataset(tmp_path / 'odd', res=12)
    _fails(tmp_path, '--data', odd, '--batch', '4', *common, match='power-of-two')
    lat = tmp_path / 'lat'
    lat.mkdir()
    for i in range(2):
        np.save(lat / f'img-mean-std-{i:08d}.npy', np.zeros((5, 8, 8), np.float32))
    _fails(tmp_path, '--data', lat, '--cond', '0', '--batch', '2', *common, match='5 channels')
    _fails(tmp_path, '--data', ds, '--preset', 'edm2-img512-huge', match='unknown train preset')
    _fails(tmp_path, '--data', ds, '--preset', '', '--batch', '4', *TINY, match='--duration')
    _fails(tmp_path, '--data', ds, '--batch', '4', '--duration', '2Xi', *TINY, match='image count')
    _fails(tmp_path, '--data', ds, '--batch', '4', '--ema-stds', '0.5', *common, match='--ema-stds')
    _fails(tmp_path, '--data', ds, '--batch', '4', *common, '--device', 'blah', match='not a torch device')
    if not torch.cuda.is_available():
        _fails(tmp_path, '--data', ds, '--batch', '4', *common, '--device', 'cuda', match='CUDA is not available')


def test_dry_run_shows_preset_and_writes_nothing(tmp_path):
    ds = _png_dataset(tmp_path / 'ds')
    r = _train('--outdir', tmp_path / 'run', '--data', ds, '--preset', 'edm2-img64-xs', '--channels', '8',
               '--channel-mult', '1', '--num-blocks', '1', '--attn-res', '', '--device', 'cpu', '-n')
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output[r.output.index('{'):])
    assert shown['duration'] == 1024 << 20 and shown['lr'] == 0.012 and shown['decay'] == 35000
    assert shown['P_mean'] == -0.8 and shown['P_std'] == 1.6 and shown['channels'] == 8 and shown['batch'] == 2048
    assert shown['network_kwargs']['label_dim'] == 2 and shown['precision'] == 'fp16'
    assert not (tmp_path / 'run').exists()


def test_without_preset_the_release_default_edm2_img512_s_applies(tmp_path):
    """The release's train_edm2.py defaults to --preset=edm2-img512-s; so does ours (configs/train.toml's row)."""
    ds = _png_dataset(tmp_path / 'ds')
    r = _train('--outdir', tmp_path / 'run', '--data', ds, *TINY, '-n')
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output[r.output.index('{'):])
    row = presets.get('train', 'edm2-img512-s')
    assert shown['duration'] == 2048 << 20 and row['duration'] in ('2048Mi', 2048 << 20)
    assert (shown['lr'], shown['decay'], shown['batch'], shown['P_mean']) == (row['lr'], row['decay'], row['batch'],
                                                                            row['P_mean'])


def test_changed_hyperparameter_on_resume_is_refused(tmp_path):
    ds = _png_dataset(tmp_path / 'ds')
    args = ['--outdir', tmp_path / 'run', '--data', ds, '--duration', '4', '--batch', '4', *TINY]
    r = _train(*args)
    assert r.exit_code == 0, r.output
    # The banner says what runs on this CPU (--fp16 is on by default) and why the loss may be negative.
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'precision fp32 (fp16 applies on CUDA only; --precision fp16 runs it here)' in log and 'goes below zero' in log
    assert (tmp_path / 'run' / 'training-state-0000000.pt').is_file()
    state = torch.load(tmp_path / 'run' / 'training-state-0000000.pt', weights_only=True)
    assert state['cur_nimg'] == 4 and state['data']['position'] == 4
    before = sorted(p.name for p in (tmp_path / 'run').iterdir())
    r = _train(*args, '--lr', '0.02')
    errors = [line for line in r.output.splitlines() if line.startswith('Error')]
    assert r.exit_code != 0 and len(errors) == 1 and 'lr: 0.01 -> 0.02' in errors[0], r.output
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == before
    r = _train(*args)  # same command: already done, nothing changes
    assert r.exit_code == 0 and 'Nothing to do' in r.output


def test_latent_dataset_trains_on_4_channel_latents(tmp_path):
    from edm2.checkpoint import load_snapshot
    lat = tmp_path / 'lat'
    lat.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(4):  # raw VAE latents: posterior mean || std, 8 channels
        arr = np.concatenate([rnd.randn(4, 8, 8) * 4, np.full((4, 8, 8), 0.1)]).astype(np.float32)
        np.save(lat / f'img-mean-std-{i:08d}.npy', arr)
    r = _train('--outdir', tmp_path / 'run', '--data', lat, '--cond', '0', '--duration', '4', '--batch', '4', *TINY)
    assert r.exit_code == 0, r.output
    net, encoder, meta = load_snapshot(next((tmp_path / 'run').glob('network-snapshot-0000000-0.100.*')))
    assert net.img_channels == 4 and net.img_resolution == 8 and net.label_dim == 0
    assert type(encoder).__name__ == 'StabilityVAEEncoder' and meta['kimg'] == 0 and meta['ema_std'] == 0.1
    # As published, EMA parameters are stored in float16; buffers (Fourier features) keep float32.
    from safetensors import safe_open
    with safe_open(str(next((tmp_path / 'run').glob('network-snapshot-0000000-0.100.*'))), 'pt') as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes['unet.out_gain'] == torch.float16 and dtypes['unet.emb_fourier.freqs'] == torch.float32
