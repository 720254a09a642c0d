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


def test_umask_permissions_even_when_the_writer_replaces_the_temporary(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / 'net.bin') as tmp:
            os.unlink(tmp)                  # e.g. safetensors writes a new file under our name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / 'net.bin').stat().st_mode) == 0o640


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys
    from edm2 import fileio
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = fileio.temporary_name(tmp_path / 'a.png')            # this process: alive
    stale = tmp_path / live.name.replace(f'edm2-{os.getpid()}-', f'edm2-{dead_pid}-')
    unrelated = tmp_path / '.a.png.x.tmp'                        # not our pattern: never touched
    for p in (live, stale, unrelated):
        p.write_bytes(b'partial')
    assert fileio.remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, unrelated.name])


def test_streamed_safetensors_read_back_by_the_safetensors_library(tmp_path):
    """save_safetensors writes the format itself (streamed, no copy of the file in memory): safetensors'
    own reader gets every tensor back bit for bit, whatever its dtype, layout or size, and the metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from edm2.fileio import save_safetensors
    torch.manual_seed(0)
    tensors = {'w': torch.randn(3, 5), 'half': torch.randn(7).half(), 'bf16': torch.randn(2, 3).bfloat16(),
               'double': torch.randn(2).double(), 'ints': torch.arange(-3, 4), 'bytes': torch.arange(9, dtype=torch.uint8),
               'mask': torch.tensor([True, False, True]), 'scalar': torch.tensor(0.25), 'empty': torch.zeros(0, 4),
               'transposed': torch.randn(4, 3).t(), 'sliced': torch.randn(6, 6)[::2, 1:4]}
    path = tmp_path / 'x.safetensors'
    save_safetensors(path, tensors, metadata={'edm2': '{"a": 1}'})
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework='pt') as f:
        assert f.metadata() == {'edm2': '{"a": 1}'}
    assert (path.stat().st_size - 8) % 8 == sum(t.numel() * t.element_size() for t in tensors.values()) % 8
    with pytest.raises(ValueError, match='not a CPU tensor'):
        save_safetensors(tmp_path / 'y.safetensors', {'a': [1, 2]})
    assert not (tmp_path / 'y.safetensors').exists()
