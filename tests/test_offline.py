"""Offline use: a download that cannot happen is one line saying what to do (the file to place in the cache,
the command that fetches it elsewhere, or a local path); a file dropped into the cache is used without a
network; `python -m edm2.download` fills a cache folder; a local VAE folder replaces the published one."""

import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edm2 import download
from edm2.download import DownloadError, cache_path, fetch
from helpers import _class_folders, _tiny_autoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 where nothing listens: connecting is refused, as on a machine behind a firewall
    that rejects outgoing connections."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return port


def assert_remedy(message, url):
    assert '\n' not in message
    assert url in message
    assert str(cache_path(url)) in message              # the exact file to place
    assert f'python -m edm2.download fetch {url} --to' in message   # the command for a connected machine
    assert 'local path' in message


def test_refused_download_is_one_line_with_the_remedy(closed_port):
    url = f'http://127.0.0.1:{closed_port}/edm2/dataset-refs/img512.pkl'
    with pytest.raises(DownloadError) as e:
        fetch(url)
    assert 'connection refused' in str(e.value)
    assert 'HTTPConnectionPool' not in str(e.value) and 'Max retries' not in str(e.value)
    assert_remedy(str(e.value), url)
    assert not cache_path(url).exists()


def test_missing_file_on_the_server_names_the_status_and_remedy(http_server):  # noqa: F811
    _, base, _ = http_server
    url = f'{base}/missing.pkl'
    with pytest.raises(DownloadError, match='HTTP status 404') as e:
        fetch(url)
    assert_remedy(str(e.value), url)


def test_cache_layout_is_host_and_path(tmp_path):
    url = 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl'
    assert cache_path(url, tmp_path) == tmp_path / 'downloads' / 'nvlabs-fi-cdn.nvidia.com' / 'edm2' / 'dataset-refs' / 'img512.pkl'
    # Nothing climbs out of the cache folder.
    odd = cache_path('http://h/../../etc/passwd', tmp_path)
    assert odd == tmp_path / 'downloads' / 'h' / 'etc' / 'passwd'


def test_a_file_dropped_into_the_cache_is_used_offline(closed_port):
    url = f'http://127.0.0.1:{closed_port}/nets/a.bin'
    target = cache_path(url)
    target.parent.mkdir(parents=True)
    target.write_bytes(b'payload')
    assert fetch(url) == target
    # The name edm2 0.1.0 used (hash of the URL + file name) is still read.
    url2 = f'http://127.0.0.1:{closed_port}/nets/b.bin'
    legacy = download._legacy_cache_path(url2)
    legacy.write_bytes(b'old')  # in CACHE/downloads, created above
    assert fetch(url2) == legacy


@pytest.mark.slow
def test_download_command_fills_a_cache_folder(http_server, tmp_path):  # noqa: F811
    root, base, seen = http_server
    (root / 'refs').mkdir()
    (root / 'refs' / 'r.pkl').write_bytes(b'statistics')
    url = f'{base}/refs/r.pkl'
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, '-m', 'edm2.download', 'fetch', url, '--to', str(tmp_path / 'carry')],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (cache_path(url, tmp_path / 'carry')).read_bytes() == b'statistics'
    # Copied into this machine's cache, the file is found there without a request.
    where = subprocess.run([sys.executable, '-m', 'edm2.download', 'where', url], capture_output=True, text=True,
                           env=env, timeout=120)
    assert where.stdout.strip() == str(cache_path(url))
    target = cache_path(url)
    target.parent.mkdir(parents=True)
    target.write_bytes((cache_path(url, tmp_path / 'carry')).read_bytes())
    assert fetch(url) == target and len(seen) == 1
    bad = subprocess.run([sys.executable, '-m', 'edm2.download', 'fetch', 'not-a-url', '--to', str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and 'expected an http(s) URL' in bad.stderr


def test_generate_with_an_unreachable_network_url_is_one_line(closed_port, tmp_path):
    from edm2.commands import generate_images
    url = f'http://127.0.0.1:{closed_port}/edm2/edm2-img64-xs-2147483-0.135.pkl'
    res = CliRunner().invoke(generate_images.main, ['--net', url, '--outdir', str(tmp_path / 'out'), '--seeds', '0'])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()  # 'Loading network from URL ...', then the error
    assert lines[-1].startswith('Error: --net ') and not any(line.startswith('Error') for line in lines[:-1])
    assert_remedy(lines[-1], url)
    assert not (tmp_path / 'out').exists()


def test_metrics_reference_url_unreachable_is_one_line(closed_port, tmp_path):
    from edm2.commands import calculate_metrics
    (tmp_path / 'images').mkdir()
    url = f'http://127.0.0.1:{closed_port}/edm2/dataset-refs/img64.pkl'
    res = CliRunner().invoke(calculate_metrics.cli, ['calc', '--images', str(tmp_path / 'images'), '--ref', url])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: '), res.output
    assert_remedy(lines[0], url)


@pytest.mark.slow  # importing diffusers takes seconds
def test_vae_offline_is_one_line_naming_the_model_and_the_flag(closed_port, tmp_path, monkeypatch):
    pytest.importorskip('diffusers')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # an empty Hugging Face cache
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{closed_port}')  # the hub refuses
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    from edm2.commands import dataset_tool
    src = _class_folders(tmp_path / 'src', sizes=((16, 16), (16, 16)))
    res = CliRunner().invoke(dataset_tool.cli, ['encode', '--source', str(src), '--dest', str(tmp_path / 'lat')])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "'stabilityai/sd-vae-ft-mse'" in lines[0] and '--vae PATH' in lines[0]
    assert not (tmp_path / 'lat').exists()


@pytest.mark.slow  # importing diffusers takes seconds
def test_vae_flag_replaces_the_files_vae(tmp_path, monkeypatch):
    """--vae PATH sets $EDM2_VAE; a StabilityVAEEncoder that names a Hugging Face model then loads the folder."""
    import torch

    from edm2.commands.cli import vae_option
    from edm2.encoders import VAE_ENV, StabilityVAEEncoder
    import click
    vae = _tiny_autoencoder()
    vae.save_pretrained(tmp_path / 'vae')
    monkeypatch.delenv(VAE_ENV, raising=False)
    command = vae_option(click.command()(lambda: None))
    assert CliRunner().invoke(command, ['--vae', str(tmp_path / 'nope')]).exit_code == 2
    res = CliRunner().invoke(command, ['--vae', str(tmp_path / 'vae')])
    assert res.exit_code == 0 and os.environ[VAE_ENV] == str(tmp_path / 'vae')
    enc = StabilityVAEEncoder()  # names stabilityai/sd-vae-ft-mse, as published files do
    enc.init('cpu')
    pixels = torch.randint(0, 256, [1, 3, 32, 32], dtype=torch.uint8)
    reference = StabilityVAEEncoder(vae=vae)
    reference.init('cpu')
    torch.testing.assert_close(enc.encode_pixels(pixels), reference.encode_pixels(pixels))
