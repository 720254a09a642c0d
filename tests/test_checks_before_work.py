"""Checks before work: output files of calculate_metrics.py refused before any statistics are computed,
EMA lengths too small to mean anything refused in one line, and unreadable detector weights (or training
states) described in our words, never with torch's advice to turn off its safe loading."""

import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from helpers import write_run

from edm2.commands import calculate_metrics
from edm2.commands import reconstruct_phema
from edm2.commands import toy_example
from edm2.commands import train_edm2
from edm2 import phema, safe_pickle
from edm2.metrics import dataset_features, inputs
from edm2.metrics import detectors as det_lib

pytestmark = pytest.mark.usefixtures('one_thread')


def _one_line_error(result, *fragments, code=2):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert 'Traceback' not in result.output and lines[-1].startswith('Error:'), result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture
def no_work(monkeypatch):
    """Any step of calculate_metrics.py that reads inputs or computes statistics fails the test."""
    def work(*args, **kwargs):
        raise AssertionError('work started before the output was checked')
    for module, name in [(dataset_features, 'open_dataset'), (inputs, 'load_checked_reference'),
                         (calculate_metrics, '_load_detectors'), (calculate_metrics, '_accumulate')]:
        monkeypatch.setattr(module, name, work)


@pytest.mark.parametrize('protocol', ['edm2', 'adm'])
def test_ref_dest_folder_or_unwritable_refused_before_statistics(tmp_path, no_work, protocol):
    (tmp_path / 'file').write_text('x')
    for dest, reason in [(tmp_path, 'is a folder'), (tmp_path / 'file' / 'ref.pkl', 'not a folder')]:
        result = CliRunner().invoke(calculate_metrics.cli, ['ref', '--data', str(tmp_path), '--dest', str(dest),
                                                            '--protocol', protocol, '--device', 'cpu'])
        _one_line_error(result, '--dest', reason, code=1)  # as gen --out


def test_calc_out_folder_or_unwritable_refused_before_statistics(tmp_path, no_work):
    (tmp_path / 'file').write_text('x')
    for out, reason in [(tmp_path, 'is a folder'), (tmp_path / 'file' / 'm.json', 'not a folder')]:
        result = CliRunner().invoke(calculate_metrics.cli, ['calc', '--images', str(tmp_path), '--ref', 'r.pkl',
                                                            '--out', str(out), '--device', 'cpu'])
        _one_line_error(result, '--out', reason, code=1)


def test_tiny_ema_lengths_are_one_line(tmp_path):
    with pytest.raises(phema.PhemaError, match='outside'):
        phema.std_to_exp(1e-300)
    assert phema.std_to_exp(phema.SIGMA_REL_MIN) > 0.9 / phema.SIGMA_REL_MIN  # the floor itself works
    run = write_run(tmp_path / 'run', 0, 4)
    for value in ['1e-300', '0.05,1e-300', '1e-7']:
        result = CliRunner().invoke(reconstruct_phema.main, ['--indir', str(run), '--outdir', str(tmp_path / 'o'),
                                                             '--outstd', value, '--device', 'cpu'])
        _one_line_error(result, '--outstd')
    assert not (tmp_path / 'o').exists()
    result = CliRunner().invoke(toy_example.cli, ['train', '--ema', '1e-300', '--outdir', str(tmp_path / 't')])
    _one_line_error(result, '--ema')
    result = CliRunner().invoke(train_edm2.main, ['--outdir', str(tmp_path / 'r'), '--data', str(tmp_path),
                                                  '--duration', '64', '--ema-stds', '1e-300'])
    _one_line_error(result, '--ema-stds')
    assert not (tmp_path / 't').exists() and not (tmp_path / 'r').exists()


class _Unlisted:
    pass


def test_unreadable_weights_get_our_message_not_torchs_advice(tmp_path):
    rng = torch.Generator().manual_seed(0)
    noise = tmp_path / 'noise.pth'
    noise.write_bytes(torch.randint(0, 256, [4096], generator=rng, dtype=torch.uint8).numpy().tobytes())
    code = tmp_path / 'object.pth'
    torch.save({'w': torch.zeros(2), 'extra': _Unlisted()}, code)  # a class outside torch's allow-list
    cut = tmp_path / 'cut.pth'
    torch.save({'w': torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:500])
    pickled = tmp_path / 'plain.pth'
    pickled.write_bytes(pickle.dumps({'w': 1}, protocol=2))
    for path in (noise, code, cut, pickled):
        with pytest.raises(det_lib.DetectorError) as info:
            det_lib.load_state_dict(path)
        text = str(info.value)
        assert str(path) in text and 'weights_only' not in text and '\n' not in text, text
        with pytest.raises(safe_pickle.UnsafePickleError) as info:
            safe_pickle.load_tensor_archive(path)
        assert 'weights_only' not in str(info.value)
    assert 'not a plain tensor file' in str(pytest.raises(det_lib.DetectorError, det_lib.load_state_dict, noise).value)
    assert 'Unlisted' in str(pytest.raises(det_lib.DetectorError, det_lib.load_state_dict, code).value)


def test_unreadable_detector_weights_on_the_command_line(tmp_path):
    noise = tmp_path / 'noise.pth'
    noise.write_bytes(bytes(range(256)) * 8)
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.full([8, 8, 3], i * 50, np.uint8)).save(folder / f'{i}.png')
    result = CliRunner().invoke(calculate_metrics.cli, [
        'ref', '--data', str(folder), '--dest', str(tmp_path / 'r.pkl'), '--metrics', 'fid', '--device', 'cpu',
        '--workers', '0', '--inception-weights', str(noise)])
    assert result.exit_code != 0 and 'Traceback' not in result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith('Error:') and str(noise) in last and 'weights_only' not in last, result.output
