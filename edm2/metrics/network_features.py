"""Detector features of images a network generates on the fly (the metrics command `gen`): the images of
a seed range go straight from the sampler into the detectors, optionally also into an ADM sample batch
file (guided-diffusion evaluator, Dhariwal & Nichol 2021), and the class of every image is gathered.

Errors are one-line `EDM2Error`s: `SamplingError` from the sampler, `OutputError` for the batch file.
"""

import os

import torch

from edm2 import distributed, generation

from . import evaluate
from .adm_npz import SampleBatchSink
from .report import cannot_write


def npz_path(path, r, repeats):
    """--save-npz FILE for evaluation r: FILE itself, or FILE-r.npz with several repeats."""
    if repeats == 1:
        return path
    root, ext = os.path.splitext(path)
    return f'{root}-{r}{ext or ".npz"}'


def _labelled(stream, record):
    """(images, positions) for the detectors, recording (position, class) of every image on the way."""
    for batch in stream:
        positions = torch.as_tensor(list(batch.positions))
        if batch.labels is not None:
            record += zip(positions.tolist(), batch.labels.tolist())
        yield batch.images, positions


def _gather_labels(record):
    """The classes of all ranks' images in seed order (rank 0), None for an unconditional network."""
    parts = distributed.gather_to_main(record)
    if not distributed.is_main() or not any(parts):
        return None
    return [label for _, label in sorted(row for part in parts for row in part)]


def _finish(sink):
    try:
        sink.finish()
    except (OSError, ValueError) as e:
        raise cannot_write(sink.path, e) from None
    distributed.print0(f'Saved the images as an ADM sample batch: {sink.path}')


def generated_stats(net, seeds, detectors, device, *, guidance, sigmas, classes, encoder, batch_size,
                    keep=(), extra=(), npz=None):
    """({feature set: FeatureStats} reduced over the ranks, the classes of the images in seed order on
    rank 0 or None) of the images `net` generates for `seeds` (`edm2.generation.generate` settings);
    `npz`: also write them as an ADM sample batch file."""
    stream = generation.generate(net, seeds, guidance=guidance, sigmas=sigmas, classes=classes, encoder=encoder,
                                 batch_size=batch_size, device=device, progress=True)
    record = []
    sink = SampleBatchSink(npz, seeds) if npz else None
    stats = evaluate.accumulate(_labelled(sink.tee(stream) if sink else stream, record), detectors, len(seeds),
                                keep=keep, device=device, extra=extra)
    if sink is not None:
        _finish(sink)
    return stats, _gather_labels(record)
