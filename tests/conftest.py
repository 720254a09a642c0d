"""Shared test helpers: where the parity fixtures live (tests/fixtures, see its README.md); the CPU thread
policy of the commands (edm2.threads), applied before any test imports torch."""

import pathlib
import sys

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
