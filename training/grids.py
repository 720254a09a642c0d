"""Sample grids during training: one row of images per tracked EMA length (and one more per length guided by
`--grid-gnet`), one column per grid seed, written as grid-{kimg:07d}.png in the run folder.

Each image is what `generate_images.py --seeds S --class C --steps N` makes from the EMA network of that
time (the Heun sampler and the seed's random stream of `edm2.generation`), decoded through the dataset's
encoder, so a latent run is shown as images. The class of column i of n is i * label_dim // n, spread over
the classes.
"""

import os

import numpy as np
import PIL.Image
import torch

from edm2 import checkpoint, generation, sampling
from edm2.errors import one_line
from edm2.fileio import atomic_write
from edm2.phema_reconstruct import find_snapshots

from .options import TrainingError

GAP = 2  # pixels between the images of a grid


def grid_file_name(nimg):
    return f'grid-{nimg // 1000:07d}.png'


def column_classes(num_columns, label_dim):
    """The class of each column, spread evenly over the classes (None for an unconditional network)."""
    return None if not label_dim else [i * label_dim // num_columns for i in range(num_columns)]


def load_guide(path, net, device):
    """The guide of `--grid-gnet`: a snapshot file, or a run folder's newest snapshot (its first EMA length
    in name order), checked against the main network."""
    try:
        if os.path.isdir(path):
            snapshots = find_snapshots(path)
            if not snapshots:
                raise TrainingError(f'--grid-gnet {path}: the folder holds no network snapshots')
            newest = max(s.nimg for s in snapshots)
            path = min((s for s in snapshots if s.nimg == newest), key=lambda s: s.std).source
        guide = checkpoint.load_network(path, device=device)
        sampling.check_guide(net, guide, f'--grid-gnet {path}')
    except (checkpoint.CheckpointError, sampling.SamplingError) as e:
        raise TrainingError(f'--grid-gnet: {one_line(e)}') from None
    except Exception as e:  # any other unreadable file is refused in one line too
        raise TrainingError(f'--grid-gnet {path}: {one_line(e)}') from None
    return guide.requires_grad_(False)


def sample_row(net, seeds, classes, steps, encoder, device, guidance=sampling.Guidance(), batch=64):
    """uint8 images [N, C, H, W] of `seeds` (classes: one per seed, or None) from `net` on this process."""
    sigmas = sampling.edm_schedule(steps)
    groups = {None: list(range(len(seeds)))} if classes is None else {}
    for i, c in enumerate(classes or []):
        groups.setdefault(c, []).append(i)
    row = [None] * len(seeds)
    for c, columns in groups.items():  # one class per call: `generate` takes one class for all its seeds
        picked = [seeds[i] for i in columns]
        stream = generation.generate(net, picked, guidance=guidance, sigmas=sigmas, encoder=encoder, device=device,
                                     classes='random' if c is None else c, batch_size=batch, rank=0, world_size=1)
        images = torch.cat([b.images.cpu() for b in stream])
        for i, image in zip(columns, images):
            row[i] = image
    return torch.stack(row)


def assemble(rows):
    """One HWC uint8 array of equally sized image rows [N, C, H, W], GAP pixels of white between images."""
    n, c, h, w = rows[0].shape
    out = np.full((len(rows) * (h + GAP) - GAP, n * (w + GAP) - GAP, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            y, x = r * (h + GAP), i * (w + GAP)
            out[y:y + h, x:x + w] = image.permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


class GridMaker:
    """Makes the grids of a run: the rows of each tracked EMA network, then the guided rows."""

    def __init__(self, opts, net, encoder, device):
        self.seeds, self.steps, self.encoder, self.device = list(opts.grid_seeds), opts.grid_steps, encoder, device
        self.classes = column_classes(len(self.seeds), int(net.label_dim))
        self.guidance = None
        if opts.grid_gnet is not None:
            guide = load_guide(opts.grid_gnet, net, device)
            self.guidance = sampling.Guidance(guides=(guide,), weight=opts.grid_guidance)

    def rows(self, ema_nets):
        """[(label, images)] for [(ema_net, std)]."""
        rows = [(f'ema {std:.3f}', sample_row(net, self.seeds, self.classes, self.steps, self.encoder, self.device))
                for net, std in ema_nets]
        if self.guidance is not None:
            rows += [(f'ema {std:.3f} guided', sample_row(net, self.seeds, self.classes, self.steps, self.encoder,
                                                          self.device, self.guidance)) for net, std in ema_nets]
        return rows

    def write(self, outdir, nimg, ema_nets):
        """Sample and write the grid of time `nimg`; returns (its path, the HWC array)."""
        with torch.no_grad():
            image = assemble([images for _, images in self.rows(ema_nets)])
        path = os.path.join(outdir, grid_file_name(nimg))
        with atomic_write(path) as f:
            PIL.Image.fromarray(image).save(f, format='PNG')
        return path, image
