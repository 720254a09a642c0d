"""dataset_tool.py convert/encode: layout, labels, transforms, bad input, atomic destination."""

import json
import zipfile

import numpy as np
import PIL.Image
import pytest
from helpers import _class_folders
from click.testing import CliRunner

from edm2.commands import dataset_tool
from edm2.data import ImageFolderDataset


def _run(*args):
    return CliRunner().invoke(dataset_tool.cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_convert_layout_labels_and_crop(tmp_path, dest_name):
    src = _class_folders(tmp_path / 'src')
    dest = tmp_path / dest_name
    r = _run('convert', '--source', src, '--dest', dest, '--resolution', '8x8', '--transform', 'center-crop')
    assert r.exit_code == 0, r.output
    assert 'Wrote 6 images' in r.output
    if dest_name.endswith('.zip'):
        with zipfile.ZipFile(dest) as z:
            assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
            names = sorted(z.namelist())
    else:
        names = sorted(p.relative_to(dest).as_posix() for p in dest.rglob('*') if p.is_file())
    assert names == ['00000/img%08d.png' % i for i in range(6)] + ['dataset.json']
    ds = ImageFolderDataset(dest, use_labels=True)
    assert ds.image_shape == (3, 8, 8) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]  # cat=0, dog=1 (sorted)
    assert not any(p.name.startswith('.') for p in tmp_path.iterdir())  # no temporary left behind


def test_convert_transforms_match_their_definition(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    arr = np.random.RandomState(1).randint(0, 256, (40, 70, 3), dtype=np.uint8)
    PIL.Image.fromarray(arr).save(src / 'a.png')
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 3]]}))
    assert _run('convert', '--source', src, '--dest', tmp_path / 'd', '--resolution', '8x8',
                '--transform', 'center-crop-dhariwal').exit_code == 0
    # ADM recipe written out independently: box-halve while the short side >= 2x8, bicubic, centre crop.
    img = PIL.Image.fromarray(arr)
    while min(img.size) >= 16:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), PIL.Image.BOX)
    s = 8 / min(img.size)
    img = np.asarray(img.resize((round(img.size[0] * s), round(img.size[1] * s)), PIL.Image.BICUBIC))
    t, l = (img.shape[0] - 8) // 2, (img.shape[1] - 8) // 2
    ds = ImageFolderDataset(tmp_path / 'd', use_labels=True)
    assert np.array_equal(ds[0][0], img[t:t + 8, l:l + 8].transpose(2, 0, 1))
    assert ds.label_dim == 4 and ds[0][1].argmax() == 3
    # Wide: a 8x4 strip centred on an 8x8 black canvas.
    assert _run('convert', '--source', src, '--dest', tmp_path / 'w', '--resolution', '8x4',
                '--transform', 'center-crop-wide').exit_code == 0
    wide = ImageFolderDataset(tmp_path / 'w')[0][0]
    assert wide.shape == (3, 8, 8) and wide[:, :2].max() == 0 and wide[:, 6:].max() == 0 and wide[:, 2:6].max() > 0


def test_convert_bad_input_is_one_line_and_writes_nothing(tmp_path):
    src = _class_folders(tmp_path / 'src')
    (src / 'dog' / '9.png').write_bytes(b'garbage')

    def fails(*args, match):
        before = set(tmp_path.iterdir())
        r = _run('convert', '--source', src, *args)
        assert r.exit_code != 0 and match in r.output, r.output
        errors = [line for line in r.output.splitlines() if line.startswith('Error')]
        assert 'Traceback' not in r.output and len(errors) == 1
        assert set(tmp_path.iterdir()) == before  # destination (and temporaries) never created
        return r

    fails('--dest', tmp_path / 'a.zip', '--resolution', '8x8', '--transform', 'center-crop', match='9.png')
    fails('--dest', tmp_path / 'b', '--resolution', '12x12', '--transform', 'center-crop', match='power of two')
    fails('--dest', tmp_path / 'c', '--resolution', '8x16', '--transform', 'center-crop', match='square')
    fails('--dest', tmp_path / 'd', '--transform', 'center-crop', match='--resolution')
    fails('--dest', tmp_path / 'e', '--resolution', 'big', match='WxH')
    r = _run('convert', '--source', src, '--dest', tmp_path / 'ok.zip', '--resolution', '8x8',
             '--transform', 'center-crop', '--skip-bad')
    assert r.exit_code == 0 and 'skipped 1' in r.output and len(ImageFolderDataset(tmp_path / 'ok.zip')) == 6
    r = _run('convert', '--source', src, '--dest', tmp_path / 'four', '--resolution', '8x8', '--max-images', 4)
    assert r.exit_code == 0 and len(ImageFolderDataset(tmp_path / 'four')) == 4
    r = _run('convert', '--source', src, '--dest', tmp_path / 'ok.zip', '--resolution', '8x8', '--skip-bad')
    assert r.exit_code != 0 and 'already exists' in r.output
    r = _run('convert', '--source', tmp_path / 'nothing', '--dest', tmp_path / 'x')
    assert r.exit_code != 0 and 'not found' in r.output


@pytest.mark.slow  # importing diffusers alone takes seconds
def test_encode_with_local_vae(tmp_path):
    encoders = pytest.importorskip('edm2.encoders')
    diffusers = pytest.importorskip('diffusers')
    import torch
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=('DownEncoderBlock2D',) * 4,
                                  up_block_types=('UpDecoderBlock2D',) * 4,
                                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  sample_size=16)
    vae.save_pretrained(tmp_path / 'vae')
    src = _class_folders(tmp_path / 'src', sizes=((16, 16), (16, 16)))
    assert _run('convert', '--source', src, '--dest', tmp_path / 'px').exit_code == 0
    r = _run('encode', '--model-url', tmp_path / 'vae', '--source', tmp_path / 'px', '--dest', tmp_path / 'lat.zip',
             '--batch', 3, '--device', 'cpu')
    assert r.exit_code == 0, r.output
    lat = ImageFolderDataset(tmp_path / 'lat.zip', use_labels=True)
    assert lat.is_latent and lat.image_shape == (8, 2, 2) and lat.labels.tolist() == [0, 0, 1, 1]
    assert lat.names[0] == '00000/img-mean-std-00000000.npy'
    enc = encoders.StabilityVAEEncoder(vae_name=str(tmp_path / 'vae'))
    enc.init(torch.device('cpu'))
    px = ImageFolderDataset(tmp_path / 'px')
    expect = enc.encode_pixels(torch.from_numpy(np.stack([px[i][0] for i in range(4)]))).float().numpy()
    got = np.stack([lat[i][0] for i in range(4)])
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)  # batching may reorder float32 sums
    r = _run('encode', '--model-url', tmp_path / 'nope', '--source', tmp_path / 'px', '--dest', tmp_path / 'l2')
    assert r.exit_code != 0 and 'nope' in r.output and not (tmp_path / 'l2').exists()
