"""edm2.data.ImageFolderDataset: folders and ZIPs of PNG / NPY, labels, subsets, flips, errors."""

import json
import zipfile

import numpy as np
import PIL.Image
import pytest

from edm2.data import DatasetError, ImageFolderDataset


def _write_images(root, n=5, res=8, channels=3, labels=True, seed=0):
    rnd = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays, names = [], []
    for i in range(n):
        name = f'{i // 3:05d}/img{i:08d}.png'
        arr = rnd.randint(0, 256, size=(res, res, channels), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(arr[:, :, 0] if channels == 1 else arr).save(root / name)
        arrays.append(arr.transpose(2, 0, 1))
        names.append(name)
    if labels:
        (root / 'dataset.json').write_text(json.dumps({'labels': [[nm, i % 4] for i, nm in enumerate(names)]}))
    return names, arrays


def _zip_folder(folder, dest):
    with zipfile.ZipFile(dest, 'w', compression=zipfile.ZIP_STORED) as z:
        for f in sorted(folder.rglob('*')):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
    return dest


@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_reads_pixels_and_onehot_labels(tmp_path, kind):
    names, arrays = _write_images(tmp_path / 'ds')
    path = tmp_path / 'ds' if kind == 'dir' else _zip_folder(tmp_path / 'ds', tmp_path / 'ds.zip')
    ds = ImageFolderDataset(path, use_labels=True)
    assert len(ds) == 5 and ds.names == names
    assert ds.resolution == 8 and ds.num_channels == 3 and ds.image_shape == (3, 8, 8)
    assert ds.has_labels and ds.label_dim == 4
    for i in range(5):
        img, label = ds[i]
        assert img.dtype == np.uint8 and np.array_equal(img, arrays[i])
        assert label.dtype == np.float32 and label.tolist() == np.eye(4)[i % 4].tolist()
    # Without use_labels the label is an empty row.
    assert ImageFolderDataset(path)[0][1].shape == (0,)


def test_grayscale_latents_subset_and_xflip(tmp_path):
    _, arrays = _write_images(tmp_path / 'g', n=3, channels=1, labels=False)
    ds = ImageFolderDataset(tmp_path / 'g', xflip=True)
    assert ds.image_shape == (1, 8, 8) and len(ds) == 6
    assert np.array_equal(ds[4][0], arrays[1][:, :, ::-1])

    lat = tmp_path / 'lat'
    lat.mkdir()
    for i in range(10):
        np.save(lat / f'img-mean-std-{i:08d}.npy', np.full((8, 4, 4), i, np.float32))
    full = ImageFolderDataset(lat)
    assert full.is_latent and full.image_shape == (8, 4, 4) and full[3][0].dtype == np.float32
    sub = ImageFolderDataset(lat, max_size=4, random_seed=1)
    assert len(sub) == 4 and sub.names == sorted(sub.names) and set(sub.names) < set(full.names)
    assert sub.names == ImageFolderDataset(lat, max_size=4, random_seed=1).names  # seeded
    assert [int(sub[i][0][0, 0, 0]) for i in range(4)] == [int(n[-12:-4]) for n in sub.names]


def test_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match='not found'):
        ImageFolderDataset(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='no PNG'):
        ImageFolderDataset(tmp_path / 'empty')
    _write_images(tmp_path / 'nolab', n=2, labels=False)
    with pytest.raises(DatasetError, match='no labels'):
        ImageFolderDataset(tmp_path / 'nolab', use_labels=True)
    rect = tmp_path / 'rect'
    rect.mkdir()
    PIL.Image.new('RGB', (8, 4)).save(rect / 'a.png')
    with pytest.raises(DatasetError, match='square'):
        ImageFolderDataset(rect)
    bad = tmp_path / 'bad'
    _write_images(bad, n=2, labels=False)
    (bad / '00000' / 'img00000001.png').write_bytes(b'not a png')
    ds = ImageFolderDataset(bad)
    with pytest.raises(DatasetError) as e:
        ds[1]
    assert 'img00000001.png' in str(e.value) and '\n' not in str(e.value)

