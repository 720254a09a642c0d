import os
import stat

import pytest

from edm2.fileio import atomic_path, atomic_write


def test_atomic_write_renames_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / 'sub' / 'out.bin'
    old = os.umask(0o022)
    try:
        with atomic_write(target) as f:
            f.write(b'abc')
            assert not target.exists()  # nothing under the final name until the block succeeds
    finally:
        os.umask(old)
    assert target.read_bytes() == b'abc'
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert os.listdir(target.parent) == ['out.bin']


def test_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_write(target, 'w') as f:
            f.write('half')
            raise RuntimeError('interrupted')
    assert target.read_text() == 'old'
    assert os.listdir(tmp_path) == ['out.txt']
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / 'other.bin') as tmp:
            open(tmp, 'wb').write(b'x')
            raise KeyError('boom')
    assert os.listdir(tmp_path) == ['out.txt']
