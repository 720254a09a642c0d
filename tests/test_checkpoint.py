"""Checkpoints: native format, safe import of published pickles, URL cache, errors, security."""

import functools
import hashlib
import io
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import _tiny_net, write_published

import edm2
from edm2 import checkpoint
from edm2.commands import checkpoint_cli
from edm2.checkpoint import CheckpointError, load_network, load_snapshot, save_network
from edm2.download import DownloadError, fetch
from edm2.encoders import StabilityVAEEncoder, StandardRGBEncoder


pytestmark = pytest.mark.usefixtures('one_thread')

def _outputs(net):
    torch.manual_seed(123)
    x = torch.randn(2, 3, 8, 8)
    labels = torch.eye(4)[:2] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.4, 3.0]), labels, return_logvar=True)


# ------------------------------------------------------------------------------------------------
# Native format.

def test_native_round_trip_with_metadata(tmp_path):
    net = _tiny_net()
    enc = StabilityVAEEncoder(vae_name='some/vae', batch_size=3)
    path = save_network(tmp_path / 'net.safetensors', net, enc, kimg=1234, ema_std=0.05, note={'a': [1, 2]})
    loaded, encoder, meta = load_snapshot(path)
    assert meta['kimg'] == 1234 and meta['ema_std'] == 0.05 and meta['note'] == {'a': [1, 2]}
    assert meta['format'] == 'native'
    assert encoder.spec() == enc.spec()
    assert loaded.init_kwargs == net.init_kwargs and not loaded.training
    for a, b in zip(_outputs(net), _outputs(loaded)):
        assert torch.equal(a, b)
    assert os.listdir(tmp_path) == ['net.safetensors']  # no temporary files left behind
    # The file is plain safetensors: readable without edm2, no pickle inside.
    from safetensors.torch import load_file
    assert set(load_file(path)) == set(net.state_dict())
    assert b'\x80\x04' not in open(path, 'rb').read(64)
    # Float16 storage keeps the values up to float16 rounding.
    path16 = save_network(tmp_path / 'net16.safetensors', net, dtype=torch.float16)
    assert os.path.getsize(path16) < 0.6 * os.path.getsize(path)
    w = load_network(path16).unet.out_conv.weight
    torch.testing.assert_close(w, net.unet.out_conv.weight.half().float(), rtol=0, atol=0)


def test_kimg_and_std_from_the_file_name(tmp_path):
    net = _tiny_net(label_dim=0)
    path = save_network(tmp_path / 'network-snapshot-0002147-0.100.safetensors', net)
    _, encoder, meta = load_snapshot(path)
    assert (meta['kimg'], meta['ema_std'], encoder) == (2147, 0.1, None)
    assert checkpoint.parse_snapshot_name('edm2-img512-xs-2147483-0.135.pkl') == ('edm2-img512-xs', 2147483, 0.135, '.pkl')
    assert checkpoint.parse_snapshot_name('net.pkl') is None
    # One rule for every reader: kimg of any width, only the two snapshot suffixes, folders ignored.
    assert checkpoint.parse_snapshot_name('/runs/a-1/network-snapshot-12345678-0.050.safetensors') == \
        ('network-snapshot', 12345678, 0.05, '.safetensors')
    assert checkpoint.parse_snapshot_name('notes-0000005-0.100.txt') is None
    assert checkpoint.snapshot_file_name('phema', 49, 0.07) == 'phema-0000049-0.070.safetensors'


def test_failed_save_leaves_nothing(tmp_path):
    net = _tiny_net()
    with pytest.raises(CheckpointError, match='JSON'):
        save_network(tmp_path / 'bad.safetensors', net, note=object())
    assert os.listdir(tmp_path) == []
    target = tmp_path / 'keep.safetensors'
    save_network(target, net, kimg=1)
    before = target.read_bytes()
    with pytest.raises(CheckpointError):
        save_network(target, net, note={1, 2})  # a set is not JSON
    assert target.read_bytes() == before and os.listdir(tmp_path) == ['keep.safetensors']


@pytest.mark.parametrize('content, message', [
    (b'', 'empty'),
    (b'hello world, not a checkpoint at all', 'not a network checkpoint'),
    (b'PK\x03\x04' + bytes(100), 'zip'),
])
def test_non_checkpoints_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / 'file.pkl'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_network(path)
    assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_truncated_files_give_one_line_errors(tmp_path):
    net = _tiny_net()
    native = save_network(tmp_path / 'n.safetensors', net).read_bytes()
    published = write_published(tmp_path / 'p.pkl', net).read_bytes()
    for name, data in [('cut.safetensors', native[:len(native) // 2]), ('cut.pkl', published[:len(published) // 2]),
                       ('header.safetensors', native[:20])]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_network(path)
        assert str(path) in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(CheckpointError, match='no such file'):
        load_network(tmp_path / 'missing.pkl')


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / 'other.safetensors'
    save_file({'w': torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match='edm2 metadata'):
        load_network(path)


# ------------------------------------------------------------------------------------------------
# Published pickles.

def test_published_format_import_and_native_conversion(tmp_path):
    net = _tiny_net()
    path = write_published(tmp_path / 'network-snapshot-0000064-0.050.pkl', net)
    imported, encoder, meta = load_snapshot(path)
    assert (meta['kimg'], meta['ema_std'], meta['format']) == (64, 0.05, 'published')
    assert meta['loss_fn'] == {'class': 'EDM2Loss', 'P_mean': -0.4, 'P_std': 1.0, 'sigma_data': 0.5}
    assert isinstance(encoder, StandardRGBEncoder)
    assert imported.gain_precision == 'fp16'
    half = _tiny_net().half().float()  # the stored values, run as the release runs them
    half.gain_precision = 'fp16'
    for a, b in zip(_outputs(half), _outputs(imported)):
        assert torch.equal(a, b)
    # convert -> native gives identical outputs, float32 or float16 storage.
    runner = CliRunner()
    for extra, name in [([], 'a.safetensors'), (['--half'], 'b.safetensors')]:
        result = runner.invoke(checkpoint_cli.cli, ['convert', str(path), str(tmp_path / name)] + extra)
        assert result.exit_code == 0, result.output
        native, _, meta2 = load_snapshot(tmp_path / name)
        assert (meta2['kimg'], meta2['ema_std']) == (64, 0.05)
        for a, b in zip(_outputs(imported), _outputs(native)):
            assert torch.equal(a, b)
    result = runner.invoke(checkpoint_cli.cli, ['info', str(tmp_path / 'a.safetensors')])
    assert result.exit_code == 0
    assert 'native' in result.output and '64 kimg' in result.output and 'sigma_rel = 0.050' in result.output
    assert f'{sum(p.numel() for p in net.parameters()):,}' in result.output
    result = runner.invoke(checkpoint_cli.cli, ['info', str(tmp_path / 'nothing.pkl')])
    assert result.exit_code == 1 and 'no such file' in result.output and 'Traceback' not in result.output


def test_published_vae_encoder_import(tmp_path):
    net = _tiny_net()
    scale = np.float32([0.5 / 4.17, 0.5 / 4.62, 0.5 / 3.71, 0.5 / 3.28])
    bias = -np.float32([5.81, 3.25, 0.12, -2.15]) * scale
    state = {'vae_name': 'stabilityai/sd-vae-ft-mse', 'scale': scale, 'bias': bias, 'batch_size': 8, '_vae': None,
             '_init_args': (), '_init_kwargs': {'vae_name': 'stabilityai/sd-vae-ft-mse'}}
    for protocol in (2, 4, 5):  # numpy arrays pickle differently under each protocol
        path = write_published(tmp_path / 'vae.pkl', net, encoder_state=('StabilityVAEEncoder', state), protocol=protocol)
        _, encoder, _ = load_snapshot(path)
        assert isinstance(encoder, StabilityVAEEncoder) and encoder.vae_name == 'stabilityai/sd-vae-ft-mse'
        np.testing.assert_array_equal(encoder.scale, scale)
        np.testing.assert_array_equal(encoder.bias, bias)
        assert encoder.batch_size == 8


@pytest.mark.parametrize('half', [False, True])
def test_published_official_fixture_round_trip(official, tmp_path, half):
    """The parity fixture converted to native (float32 or float16 storage) gives identical outputs."""
    src = official('main-rgb16.pkl')
    net = load_network(src)
    dst = tmp_path / 'main.safetensors'
    result = CliRunner().invoke(checkpoint_cli.cli, ['convert', str(src), str(dst)] + (['--half'] if half else []))
    assert result.exit_code == 0, result.output
    native = load_network(dst)
    x = torch.randn(3, 3, 16, 16)
    labels = torch.eye(10)[:3]
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([0.1, 1.0, 10.0]), labels), native(x, torch.tensor([0.1, 1.0, 10.0]), labels))


# ------------------------------------------------------------------------------------------------
# Security: nothing from the file runs.

class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_reduce_payload_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / 'pwned-a'
    payload = pickle.dumps({'ema': _Shell(marker)})
    pickle.loads(payload)  # control: the stock unpickler runs the command
    assert marker.exists()
    marker.unlink()
    path = tmp_path / 'evil.pkl'
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r'refusing to load global (posix|os|nt)\.system') as e:
        load_network(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / 'pwned-b'
    src = f'import pathlib\npathlib.Path({str(marker)!r}).write_text("ran")\nraise SystemExit(1)\n'
    net = _tiny_net()
    path = write_published(tmp_path / 'evil-src.pkl', net, module_src=src)
    loaded = load_network(path)  # loads fine: the source is ignored, our own classes are used
    assert type(loaded).__module__ == 'edm2.networks'
    assert not marker.exists()


def _storage_pickle(nested):
    """A pickle holding one tensor whose storage is the torch.save archive `nested`, as in published pickles."""
    class Storage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (nested,)

    class Tensor:
        def __reduce__(self):
            import collections
            return torch._utils._rebuild_tensor_v2, (Storage(), 0, (1,), (1,), False, collections.OrderedDict())
    return pickle.dumps({'ema': Tensor()}, protocol=4)


@pytest.mark.parametrize('zipfile', [True, False])
def test_nested_storage_archive_payload_is_refused(tmp_path, zipfile):
    marker = tmp_path / 'pwned-c'
    buf = io.BytesIO()
    torch.save(_Shell(marker), buf, _use_new_zipfile_serialization=zipfile)
    nested = buf.getvalue()
    torch.load(io.BytesIO(nested), weights_only=False)  # control: torch's stock loader runs it
    assert marker.exists()
    marker.unlink()
    path = tmp_path / 'evil-storage.pkl'
    path.write_bytes(_storage_pickle(nested))
    with pytest.raises(CheckpointError, match='nested tensor archive: not a plain tensor file') as e:
        load_network(path)
    assert '\n' not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


def test_other_globals_are_refused_by_name(tmp_path):
    path = tmp_path / 'g.pkl'
    path.write_bytes(pickle.dumps({'ema': functools.partial(print, 1)}))
    with pytest.raises(CheckpointError, match='functools.partial'):
        load_network(path)


# ------------------------------------------------------------------------------------------------
# URLs: downloads into the cache from a server on 127.0.0.1.

def test_fetch_downloads_once_and_checks_hash(http_server, tmp_path):
    root, base, seen = http_server
    net = _tiny_net()
    save_network(root / 'network-snapshot-0000016-0.100.safetensors', net)
    digest = hashlib.sha256((root / 'network-snapshot-0000016-0.100.safetensors').read_bytes()).hexdigest()
    url = f'{base}/network-snapshot-0000016-0.100.safetensors'
    path = fetch(url, sha256_prefix=digest[:12])
    assert path.is_file() and str(path).startswith(os.environ['EDM2_CACHE_DIR'])
    assert len(seen) == 1
    loaded, _, meta = edm2.load_snapshot(url)  # reused: no new request; name still gives kimg/std
    assert len(seen) == 1 and (meta['kimg'], meta['ema_std']) == (16, 0.1)
    for a, b in zip(_outputs(net), _outputs(loaded)):
        assert torch.equal(a, b)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files

    # A wrong hash prefix: refused, nothing cached.
    cache = tmp_path / 'other-cache'
    with pytest.raises(DownloadError, match='SHA-256'):
        fetch(url, cache_dir=cache, sha256_prefix='0000000000')
    assert not any(p.is_file() for p in cache.rglob('*'))
    # Missing file on the server: one line naming the URL.
    with pytest.raises(DownloadError, match='404') as e:
        fetch(f'{base}/missing.pkl')
    assert f'{base}/missing.pkl' in str(e.value) and '\n' not in str(e.value)
