"""Shared fixtures: where the parity fixtures live (tests/fixtures, see its README.md), the tiny networks of
the generating commands, the sweep's inputs, an isolated download cache, one thread for tiny tensors; the CPU
thread policy of the commands (edm2.threads), applied before any test imports torch. Plain helper functions are
in helpers.py."""

import http.server
import pathlib
import sys
import threading

import pytest

from edm2 import threads

threads.configure()  # one thread unless $EDM2_THREADS / $OMP_NUM_THREADS say otherwise; waiting threads sleep

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / 'tests' / 'fixtures'

if str(REPO) not in sys.path:  # the command-line modules live at the top level
    sys.path.insert(0, str(REPO))


def fixture_path(*parts) -> pathlib.Path:
    """Path of a parity fixture in tests/fixtures; the test fails when it is missing (they are part of the
    repository)."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f'parity fixture missing: {path} (tests/fixtures is part of the repository)')
    return path


@pytest.fixture
def official():
    """Callable: official('main-rgb16.pkl') -> path (fails when missing)."""
    return lambda name: fixture_path('official', name)


@pytest.fixture
def detectors():
    return lambda name: fixture_path('detectors', name)


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    """Tiny native checkpoints: a conditional main net, guides of matching and mismatching shapes."""
    import math

    import torch

    from edm2.checkpoint import save_network
    from edm2.encoders import StandardRGBEncoder
    from helpers import tiny_conditional_net
    folder = tmp_path_factory.mktemp('nets')
    specs = {'main': (0, {}), 'guide': (1, dict(model_channels=4)), 'uncond': (2, dict(label_dim=0)),
             'res16': (3, dict(img_resolution=16)), 'labels3': (4, dict(label_dim=3)),
             'rgba': (5, dict(img_channels=4)), 'nan': (6, {})}
    paths = {}
    for name, (seed, overrides) in specs.items():
        paths[name] = str(folder / f'{name}.safetensors')
        net = tiny_conditional_net(seed, **overrides)
        if name == 'nan':  # a network whose output is NaN: nothing may be written from it
            with torch.no_grad():
                net.unet.out_gain.fill_(math.nan)
        save_network(paths[name], net, StandardRGBEncoder())
    return paths


@pytest.fixture(scope='module')
def sweep_assets(tmp_path_factory):
    """The sweep's inputs (helpers.make_sweep_assets): random-weight detectors, references, snapshot runs."""
    from helpers import make_sweep_assets
    return make_sweep_assets(tmp_path_factory.mktemp('sweep-assets'))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/edm2 from tests."""
    monkeypatch.setenv('EDM2_CACHE_DIR', str(tmp_path / 'edm2-cache'))


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for tests of tiny tensors (`pytestmark = pytest.mark.usefixtures('one_thread')`),
    whatever $EDM2_THREADS says: they gain nothing from two, and OpenMP threads waiting for each other slowed
    tiny forwards from 0.05 s to 2-4 s on a busy 2-core machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / 'www'
    root.mkdir()
    requests_seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            requests_seen.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f'http://127.0.0.1:{server.server_address[1]}', requests_seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
