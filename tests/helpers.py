"""Plain helpers shared by several test modules (the shared fixtures are in conftest.py, which builds them with
these): tiny networks and the files they are written to, the sweep's inputs and flags, published-format
pickles written without the release, an analytic denoiser, and random images. No test module imports
another test module; what two of them need lives here."""

import contextlib
import json
import os
import pathlib
import pickle
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2.checkpoint import save_network
from edm2.commands import generate_images, train_edm2
from edm2.encoders import StandardRGBEncoder
from edm2.metrics import detectors as det_lib
from edm2.metrics.reference import save_reference
from edm2.networks import build_network
from edm2.phema import PowerFunctionEMA
from edm2.sweep import run as sweep_lib
from edm2.sweep import source as sweep_source

REPO = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# Tiny networks for generate_images.py (conftest.nets writes them).

def tiny_conditional_net(seed, **overrides):
    """A tiny conditional (4 classes) 8x8 RGB network whose output depends on its input (out_gain 1)."""
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1], num_blocks=1,
                  attn_resolutions=[])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    net = build_network(kwargs)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)  # out_gain starts at 0 (D = c_skip x); make the net do something
    return net.eval()


def run_cli(*args):
    """generate_images.py in process (exceptions caught, as a user sees them)."""
    result = CliRunner().invoke(generate_images.main, [str(a) for a in args])
    return result


def pngs(folder):
    """The PNG files under `folder`, relative paths, sorted ([] when it does not exist)."""
    folder = pathlib.Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*.png')) if folder.exists() else []


# ------------------------------------------------------------------------------------------------
# Snapshot folders.

LOCK_NET = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
                attn_resolutions=[], num_blocks=1, channels_per_head=8)


def write_snapshots(folder):
    """Four native snapshots of one tiny unconditional network (kimg 8 and 16 x EMA lengths 0.05 and 0.10)."""
    torch.manual_seed(0)
    net = build_network(dict(LOCK_NET)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    for kimg in (8, 16):
        for std in (0.05, 0.10):
            save_network(folder / f'network-snapshot-{kimg:07d}-{std:.3f}.safetensors', net, kimg=kimg, ema_std=std)
    return folder


# ------------------------------------------------------------------------------------------------
# The sweep's inputs (conftest.sweep_assets), flags and a synthetic metric.

STDS = (0.05, 0.10)
STEP_IMAGES = 256


def tiny_sweep_net(seed, channels, attn_resolutions=()):
    """A tiny unconditional 8x8 RGB network of `channels` channels whose output depends on its input."""
    torch.manual_seed(seed)
    net = build_network(dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=channels,
                             channel_mult=[1], num_blocks=1, attn_resolutions=list(attn_resolutions),
                             channels_per_head=4))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)  # out_gain starts at 0 (D = c_skip x); make the net do something
    return net.eval()


def write_run(folder, seed, channels, steps=12, every=4, attn_resolutions=()):
    """Snapshots of a random-walk 'training' tracked by the power-function EMA at STDS, every `every` steps
    (kimg 1, 2, 3 for the defaults), as native files named like the trainer's."""
    folder.mkdir()
    net = tiny_sweep_net(seed, channels, attn_resolutions)
    ema = PowerFunctionEMA(net, stds=STDS)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        nimg = step * STEP_IMAGES
        ema.update(cur_nimg=nimg, batch_size=STEP_IMAGES)
        if step % every == 0:
            for ema_net, std in ema.get():
                save_network(folder / f'network-snapshot-{nimg // 1000:07d}-{std:.3f}.safetensors', ema_net,
                             StandardRGBEncoder(), kimg=nimg // 1000, ema_std=std, nimg=nimg)
    return folder


def make_sweep_assets(root):
    """Random-weight detectors, reference statistics and three snapshot runs (main, guide, one with attention)
    in `root`: {name: path}."""
    inc, dino = root / 'inception-tiny.pth', root / 'dinov2-tiny.pth'
    torch.save(det_lib.random_state_dict('inception', width_divisor=16), inc)
    torch.save(det_lib.random_state_dict('dinov2', embed_dim=32, depth=1, grid_size=4), dino)
    rng = np.random.RandomState(0)
    ref = {'fid': {'mu': rng.randn(128) * 0.1, 'sigma': np.eye(128) * 0.01},
           'fd_dinov2': {'mu': rng.randn(32) * 0.1, 'sigma': np.eye(32) * 0.01}}
    save_reference(root / 'ref.pkl', ref)
    save_reference(root / 'ref-fid.pkl', {'fid': ref['fid']})
    return dict(root=root, inception=str(inc), dinov2=str(dino), ref=str(root / 'ref.pkl'),
                ref_fid=str(root / 'ref-fid.pkl'), main=str(write_run(root / 'main', 0, 8)),
                guide=str(write_run(root / 'guide', 1, 4)),
                attn=str(write_run(root / 'attn', 2, 8, attn_resolutions=[8])))


def detector_flags(assets):
    """The flags that point calculate_metrics.py at the assets' random-weight detectors, on the CPU."""
    return ['--inception-weights', assets['inception'], '--dinov2-weights', assets['dinov2'], '--workers', '0',
            '--device', 'cpu']


def sweep_args(assets, outdir, extra=()):
    """calculate_metrics.py arguments of a small sweep (2 x 2 x 2 cells, 4 images each)."""
    return ['sweep', '--net-dir', assets['main'], '--net-std', '0.06,0.09', '--gnet-dir', assets['guide'],
            '--gnet-kimg', '2', '--gnet-std', '0.05,0.08', '--guidance', '1.5,2.5', '--ref', assets['ref'],
            '--metrics', 'fid,fd_dinov2', '--num-images', '4', '--steps', '2', '--batch', '2',
            '--outdir', str(outdir), *extra, *detector_flags(assets)]


def self_sweep_args(sweep_assets, outdir, extra=()):
    """sweep_args with the self guide self:pag of the attention network and two rules."""
    return ['sweep', '--net-dir', sweep_assets['attn'], '--net-std', '0.06,0.09', '--gnet', 'self:pag',
            '--guidance', '1.5,2.5', '--guidance-rule', 'lerp', '--guidance-rule', 'apg:eta=0', '--ref', sweep_assets['ref'],
            '--metrics', 'fid,fd_dinov2', '--num-images', '4', '--steps', '6', '--batch', '2',
            '--outdir', str(outdir), *extra, *detector_flags(sweep_assets)]


def sweep_cells(outdir):
    """The records of `outdir`/cells.jsonl."""
    with open(os.path.join(outdir, 'cells.jsonl')) as f:
        return [json.loads(line) for line in f]


def cells_by_key(cells):
    """{(net_std, gnet_std, guidance, rule, interval): record}."""
    return {(c['net_std'], c['gnet_std'], c['guidance'], c.get('rule', 'lerp'), c.get('interval')): c for c in cells}


def sweep_config(assets, net_stds=(0.05, 0.07, 0.09), gnet_stds=(0.05, 0.08), guidances=(1.5, 2.0, 2.5),
                 search='grid', phema_batch=2, guide_batch=None, num=4):
    """A SweepConfig over the assets' main and guide runs (the guide at kimg 2)."""
    net = sweep_source.snapshot_source(assets['main'], None, list(net_stds), '--net')
    gnet = sweep_source.snapshot_source(assets['guide'], 2, list(gnet_stds), '--gnet')
    return sweep_lib.SweepConfig(net, gnet, guidances, ['fid'], num, batch=2, phema_batch=phema_batch,
                                 guide_batch=guide_batch, search=search, ref_name='synthetic')


def synthetic_surface(cell, net, gnet):
    """A unimodal synthetic metric of the axis values (`cell_metrics` of run_sweep); also checks the networks
    are the right ones."""
    assert abs(net.unet.out_gain.item() - 1.0) < 1.0 and gnet is not None
    return {'fid': (cell['net_std'] - 0.07) ** 2 * 1e4 + (cell['gnet_std'] - 0.05) ** 2 * 1e4
            + (cell['guidance'] - 2.0) ** 2}


# ------------------------------------------------------------------------------------------------
# Writing published-format pickles without the release: stand-in globals are
# registered under the release's module names only while pickling.

# The init kwargs a tiny published-format pickle stores (those the tests' tiny networks set).
PUBLISHED_KWARGS = ('img_resolution', 'img_channels', 'label_dim', 'model_channels', 'channel_mult', 'attn_resolutions',
                    'num_blocks', 'channels_per_head')

@contextlib.contextmanager
def _release_modules():
    def reconstruct(meta):  # never called: loading goes through edm2's restricted unpickler
        raise AssertionError('the stand-in reconstructor must not run')
    reconstruct.__module__, reconstruct.__qualname__ = 'torch_utils.persistence', '_reconstruct_persistent_obj'

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    mods = {name: types.ModuleType(name) for name in ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util')}
    mods['torch_utils.persistence']._reconstruct_persistent_obj = reconstruct
    mods['dnnlib.util'].EasyDict = EasyDict
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield reconstruct, EasyDict
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Persistent:
    def __init__(self, reconstruct, class_name, state, module_src):
        self.args = (reconstruct, ({'type': 'class', 'version': 6, 'module_src': module_src,
                                    'class_name': class_name, 'state': state},))

    def __reduce__(self):
        return self.args


class _ModuleDictPickle:
    def __init__(self, state):
        self.state = state

    def __reduce__(self):  # the class global + its __dict__ (BUILD), like a pickled ModuleDict
        return torch.nn.ModuleDict, (), self.state


def _module_state(module, reconstruct, module_src, init_kwargs=None):
    state = {'training': False, '_parameters': {}, '_buffers': {}, '_modules': {}}
    for name, p in module._parameters.items():
        state['_parameters'][name] = None if p is None else torch.nn.Parameter(p.detach().half(), requires_grad=False)
    for name, b in module._buffers.items():
        state['_buffers'][name] = None if b is None else b.detach().half()
    for name, child in module._modules.items():
        if child is None:
            state['_modules'][name] = None
        elif isinstance(child, torch.nn.ModuleDict):
            state['_modules'][name] = _ModuleDictPickle(_module_state(child, reconstruct, module_src))
        else:
            state['_modules'][name] = _Persistent(reconstruct, type(child).__name__,
                                                  _module_state(child, reconstruct, module_src), module_src)
    state['_init_args'] = ()
    state['_init_kwargs'] = dict(init_kwargs or {})
    return state


def write_published(path, net, module_src='# placeholder\n', encoder_state=None, protocol=4):
    """A published-format snapshot of `net` (float16 storage, like the release)."""
    with _release_modules() as (reconstruct, EasyDict):
        kwargs = {k: v for k, v in net.init_kwargs.items() if k in PUBLISHED_KWARGS}
        ema = _Persistent(reconstruct, 'Precond', dict(_module_state(net, reconstruct, module_src, kwargs),
                                                         img_resolution=net.img_resolution, sigma_data=0.5), module_src)
        enc = _Persistent(reconstruct, encoder_state[0] if encoder_state else 'StandardRGBEncoder',
                          encoder_state[1] if encoder_state else {'_init_args': (), '_init_kwargs': {}}, module_src)
        data = EasyDict(encoder=enc, dataset_kwargs=EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip'),
                        loss_fn=_Persistent(reconstruct, 'EDM2Loss', {'P_mean': -0.4, 'P_std': 1.0, 'sigma_data': 0.5,
                                                                      '_init_args': (), '_init_kwargs': {}}, module_src),
                        ema=ema)
        with open(path, 'wb') as f:
            pickle.dump(data, f, protocol=protocol)  # numpy arrays: protocol 5 uses _frombuffer
    return path


# ------------------------------------------------------------------------------------------------
# An analytic denoiser and random images.

class Gaussian:
    """Ideal denoiser of N(mu, s^2 I) data; counts calls and records the sigmas and labels it was given."""

    def __init__(self, mu=0.3, s=0.5, img_channels=3, img_resolution=4, label_dim=0):
        self.mu, self.s2 = mu, s * s
        self.img_channels, self.img_resolution, self.label_dim = img_channels, img_resolution, label_dim
        self.calls, self.sigmas, self.labels = 0, [], []

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        self.sigmas.append(float(sigma))
        self.labels.append(labels)
        mu = self.mu
        if labels is not None:  # a class-dependent mean, so that labels matter
            mu = mu + 0.1 * labels.argmax(dim=1).to(x.dtype).reshape(-1, 1, 1, 1)
        return mu + self.s2 / (self.s2 + sigma ** 2) * (x - mu)


def make_images(root, n=8, res=8, seed=0):
    """Random-noise PNGs (so that a truncated copy really is truncated), unconditional."""
    rnd = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        PIL.Image.fromarray(rnd.randint(0, 256, (res, res, 3), dtype=np.uint8)).save(root / f'{i:03d}.png')
    return root


COLORS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230]], np.uint8)


def make_shapes(root, n=96, res=8, seed=0):
    """Class 0: red 5x5 square, class 1: green horizontal bar, class 2: blue vertical bar; random offsets."""
    rnd = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        c = i % 3
        img = np.zeros((res, res, 3), np.uint8)
        x0, y0 = rnd.randint(0, 3, 2)
        if c == 0:
            img[y0:y0 + 5, x0:x0 + 5] = COLORS[c]
        elif c == 1:
            img[y0 + 2:y0 + 4, :] = COLORS[c]
        else:
            img[:, x0 + 1:x0 + 4] = COLORS[c]
        name = f'{i // 1000:05d}/img{i:08d}.png'
        (root / name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(img).save(root / name)
        labels.append([name, c])
    (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
    return root


def net_args(channels=8):
    return ['--channels', channels, '--channel-mult', '1,2', '--num-blocks', '1', '--attn-res', '',
            '--decay', '0', '--rampup', '0', '--device', 'cpu']


def train_inprocess(*args):
    r = CliRunner().invoke(train_edm2.main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(REPO))


TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2],
            attn_resolutions=[4], num_blocks=1, channels_per_head=8)


def _tiny_net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = build_network(dict(TINY, **overrides)).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.8)
    return net


def _class_folders(root, sizes=((20, 12), (12, 20), (16, 16))):
    rnd = np.random.RandomState(0)
    for c, cls in enumerate(['cat', 'dog']):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            PIL.Image.fromarray(rnd.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f'{i}.png')
    return root


def _tiny_autoencoder():
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=('DownEncoderBlock2D',) * 4,
                                   up_block_types=('UpDecoderBlock2D',) * 4,
                                   block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                   sample_size=32)
