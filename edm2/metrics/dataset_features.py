"""Detector features of the images of a dataset folder or ZIP (the metrics commands `ref` and `calc`):
opening the folder, the disjoint subsets evaluated by `--repeats`, and each rank's share of the images
read by a data loader and run through the detectors.

A file that cannot be read ends the stream of the rank that met it; that rank still takes part in the
collective reduction, so that no rank waits forever, and then every rank stops with a `DatasetError`
(the one that met the file names it). Errors are one-line `EDM2Error`s.
"""

import numpy as np
import torch
import tqdm

from edm2 import distributed
from edm2.data import DatasetError, ImageFolderDataset
from edm2.errors import one_line

from . import evaluate


def open_dataset(path, what) -> ImageFolderDataset:
    """The images at `path` (`what` names them in messages): 1- or 3-channel images, not latents."""
    dataset = ImageFolderDataset(path)
    if getattr(dataset, 'is_latent', False):
        raise DatasetError(f'{what} {path} holds latents (.npy); metrics need images (PNG)')
    if dataset.num_channels not in (1, 3):
        raise DatasetError(f'{what} {path} has {dataset.num_channels}-channel images; expected 1 or 3')
    return dataset


def subsets(n_avail, num, repeats, seed, source) -> list:
    """Disjoint position lists of `num` images for the repeats: consecutive blocks in sorted order when the
    folder holds exactly num * repeats images (files named by seed give the papers' seed ranges), otherwise
    seeded random disjoint subsets."""
    need = num * repeats
    if n_avail < need:
        raise DatasetError(f'{source} holds {n_avail} images, fewer than --num {num}' +
                           (f' x --repeats {repeats} = {need}' if repeats > 1 else ''))
    order = np.arange(n_avail) if n_avail == need else np.random.RandomState(seed % (1 << 31)).permutation(n_avail)
    return [np.sort(order[r * num:(r + 1) * num]) for r in range(repeats)]


def kept_slots(num_items, keep_num, seed):
    """The `keep_slots` of `evaluate.accumulate` that store the features of a seeded random subset of
    `keep_num` of the `num_items` images (None: there are no more than that, every row is stored)."""
    if num_items <= keep_num:
        return None
    chosen = np.sort(np.random.RandomState(seed % (1 << 31)).permutation(num_items)[:keep_num])
    slots = np.full(num_items, -1, dtype=np.int64)
    slots[chosen] = np.arange(keep_num)
    return slots


class _Items(torch.utils.data.Dataset):
    """Items `indices` of an ImageFolderDataset as (uint8 image, position); read errors become strings."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, pos):
        try:
            image, _ = self.dataset[int(self.indices[pos])]
        except ValueError as e:  # DatasetError: unreadable or mismatched file
            return one_line(e)
        return image, pos


def _collate(items):
    for item in items:
        if isinstance(item, str):
            return item
    return torch.from_numpy(np.stack([im for im, _ in items])), torch.tensor([p for _, p in items])


def _batches(dataset, indices, batch, workers, desc, errors):
    """This rank's batches (uint8 images, positions into `indices`), with a progress bar on rank 0.
    A file that cannot be read ends the stream, its message appended to `errors`."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = np.arange(len(indices))[rank::world]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_Items(dataset, indices), mine.tolist()), batch_size=batch, shuffle=False,
        num_workers=workers, collate_fn=_collate, prefetch_factor=2 if workers > 0 else None)
    bar = tqdm.tqdm(total=len(mine), unit='img', desc=desc, leave=False) if distributed.is_main() else None
    try:
        for b in loader:
            if isinstance(b, str):
                errors.append(b)
                return
            if bar is not None:
                bar.update(len(b[1]))
            yield b
    finally:
        if bar is not None:
            bar.close()


def accumulate_dataset(dataset, positions, detectors, device, *, batch, workers, desc, **kwargs) -> dict:
    """{feature set: FeatureStats} of the images `positions` of `dataset`, split over the ranks and
    reduced (`kwargs`: keep, keep_slots, extra of `evaluate.accumulate`)."""
    errors = []
    batches = _batches(dataset, positions, batch, workers, desc, errors)
    stats = evaluate.accumulate(batches, detectors, len(positions), device=device, **kwargs)
    failed = distributed.all_reduce_sum(torch.tensor([float(bool(errors))], device=device))
    if errors:
        raise DatasetError(errors[0])
    if failed.item() > 0:
        raise DatasetError('another rank could not read its images (see its message)')
    return stats
