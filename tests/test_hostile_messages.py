"""Messages that point the right way: a 0-byte file says "empty file" wherever a file is read (detector
weights, references, ADM batches, snapshots, training state), and no message ever suggests loading a file
"unsafely" (numpy's allow_pickle, torch's weights_only=False): random bytes given as an .npz are "not a
valid .npz file"."""

import io
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from edm2 import checkpoint, data, safe_pickle
from edm2.commands import calculate_metrics
from edm2.errors import EDM2Error
from edm2.metrics import adm_npz, detectors, reference

UNSAFE = ('allow_pickle', 'weights_only', 'unsafely', 'pickle.load')


def _message(call, *args):
    with pytest.raises((EDM2Error, safe_pickle.UnsafePickleError)) as e:
        call(*args)
    text = str(e.value)
    assert '\n' not in text and not any(word in text for word in UNSAFE), text
    return text


def test_empty_files_say_empty_file_everywhere(tmp_path):
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    for call in (lambda p: detectors.load_state_dict(p, 'Inception-v3 (FID)'), reference.load_reference,
                 adm_npz.AdmBatch, checkpoint.load_snapshot, safe_pickle.load_tensor_archive):
        text = _message(call, str(empty))
        assert 'empty file' in text and ('empty.pth' in text or call is safe_pickle.load_tensor_archive), text
    images = tmp_path / 'images'
    images.mkdir()
    PIL.Image.new('RGB', (8, 8)).save(images / '0.png')
    result = CliRunner().invoke(calculate_metrics.cli, ['ref', '--data', str(images), '--dest',
                                                        str(tmp_path / 'r.pkl'), '--inception-weights', str(empty),
                                                        '--device', 'cpu'])
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    last = result.output.splitlines()[-1]
    assert 'empty file' in last and str(empty) in last, last


def test_no_message_suggests_an_unsafe_option(tmp_path):
    rng = np.random.RandomState(0)
    random_bytes = tmp_path / 'random.npz'
    random_bytes.write_bytes(rng.bytes(3000))
    text = _message(adm_npz.AdmBatch, str(random_bytes))
    assert 'not a valid .npz file' in text and str(random_bytes) in text, text
    with_object = tmp_path / 'object.npz'  # a ZIP whose member is a pickled object array
    buf = io.BytesIO()
    np.save(buf, np.array([{'x': 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(with_object, 'w') as z:
        z.writestr('mu.npy', buf.getvalue())
        z.writestr('sigma.npy', buf.getvalue())
    _message(reference.load_reference, str(with_object))
    _message(adm_npz.AdmBatch(str(with_object)).array, 'mu')
    for payload in (rng.bytes(3000), buf.getvalue()):
        _message(data.decode_array, payload, 'img-mean-std-00000000.npy')
