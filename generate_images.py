"""Generate images with EDM2 networks, optionally guided (autoguidance, classifier-free guidance,
guidance interval, several guides at once). See `python generate_images.py --help`.

Same flags, seeds and file names as the published tool: `--seeds 0-49999` writes the same images
(`{seed:06d}.png`) the published release writes for those seeds. Runs on CPU, one GPU, or
`torchrun --nproc_per_node=N generate_images.py ...` (seeds split over the ranks as the published tool splits them).
"""

import math
import os
import re

import click
import numpy as np
import torch

from edm2 import distributed, presets, sampling
from edm2.fileio import atomic_write
from edm2.metrics.adm_npz import SampleBatchSink

EXAMPLES = """
\b
Examples:
  # 64 images with a published preset (downloads the networks once into ~/.cache/edm2)
  python generate_images.py --preset edm2-img512-s-autog-fid --outdir out --seeds 0-63
\b
  # Autoguidance with your own networks: main net, a smaller/shorter-trained guide, weight 2.1
  python generate_images.py --net main.safetensors --gnet guide.safetensors --guidance 2.1 --outdir out
\b
  # Classifier-free guidance restricted to sigma in (0.28, 2.9]
  python generate_images.py --preset edm2-img512-s-guid-fid --guidance 2.1 \\
      --guidance-interval 0.28,2.9 --outdir out
\b
  # Two guides at once (unconditional net and early small net), extra weight split 30/70
  python generate_images.py --net main.pkl --gnet uncond.pkl --gnet early.pkl \\
      --guide-weights 0.3,0.7 --guidance 2.0 --outdir out
\b
  # 50k images for FID on 8 GPUs, resumable; a contact sheet of the first 64 seeds
  torchrun --nproc_per_node=8 generate_images.py --preset edm2-img512-xxl-fid \\
      --outdir out --subdirs --seeds 0-49999 --skip-existing
  python generate_images.py --preset edm2-img64-s-fid --seeds 0-63 --grid grid.png
"""

_SAMPLER_FLAGS = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise')


# ----------------------------------------------------------------------------------------------------
# Parsing.

def parse_int_list(text):
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]; ValueError with a one-line reason otherwise."""
    values = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:\s*-\s*(\d+))?', part)
        if not m:
            raise ValueError(f'expected non-negative integers or ranges like 0-63, separated by commas; got {part!r}')
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f'empty range {part!r} (end before start)')
        values.extend(range(lo, hi + 1))
    return values


class IntList(click.ParamType):
    name = 'LIST'

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return parse_int_list(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class FloatList(click.ParamType):
    name = 'LIST'

    def __init__(self, length=None):
        self.length = length

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        try:
            values = [float(v) for v in str(value).split(',')]
        except ValueError:
            self.fail(f'expected comma-separated numbers, got {value!r}', param, ctx)
        if any(math.isnan(v) for v in values):
            self.fail(f'expected numbers, got {value!r}', param, ctx)
        if self.length is not None and len(values) != self.length:
            self.fail(f'expected {self.length} comma-separated numbers, got {value!r}', param, ctx)
        return values


def image_path(outdir, seed, subdirs):
    """Where the image of `seed` goes: {seed:06d}.png, under {seed//1000*1000:06d}/ with --subdirs."""
    name = f'{seed:06d}.png'
    if subdirs:
        return os.path.join(outdir, f'{seed // 1000 * 1000:06d}', name)
    return os.path.join(outdir, name)


# ----------------------------------------------------------------------------------------------------
# Writing.

def _to_pil(image):
    """uint8 [C, H, W] -> PIL image (C = 1 or 3)."""
    import PIL.Image
    array = image.permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        return PIL.Image.fromarray(array[:, :, 0], 'L')
    if array.shape[2] == 3:
        return PIL.Image.fromarray(array, 'RGB')
    raise click.ClickException(f'cannot write images with {array.shape[2]} channels as PNG; '
                               f'a latent network needs its encoder to decode to RGB')


def write_png_atomic(path, pil_image):
    """Write a PNG under a temporary name in the same folder, then rename: never a half-written file."""
    with atomic_write(path) as f:
        pil_image.save(f, format='PNG')


def make_grid(images):
    """uint8 [H, W, C] arrays (same shape) -> one contact sheet, ceil(sqrt(n)) columns, row-major."""
    n = len(images)
    h, w, c = images[0].shape
    cols = max(int(math.ceil(math.sqrt(n))), 1)
    rows = int(math.ceil(n / cols))
    grid = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def _gather_to_rank0(obj):
    """A list of every rank's `obj` on rank 0 (None elsewhere)."""
    if distributed.get_world_size() == 1:
        return [obj]
    out = [None] * distributed.get_world_size() if distributed.is_main() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


# ----------------------------------------------------------------------------------------------------
# The command.

def _load(url, device, what):
    import edm2
    from edm2.checkpoint import CheckpointError
    try:
        return edm2.load_snapshot(url, device=device)
    except CheckpointError as e:
        raise click.ClickException(f'{what}: {e}') from None


def _load_all(net_url, gnet_urls, device):
    """Rank 0 loads (and downloads) first, the other ranks then read the cache."""
    if not distributed.is_main():
        distributed.barrier()
    distributed.print0(f'Loading network from {net_url} ...')
    net, encoder, _ = _load(net_url, device, '--net')
    gnets = []
    for k, url in enumerate(gnet_urls):
        distributed.print0(f'Loading guiding network from {url} ...')
        gnets.append(_load(url, device, '--gnet' if len(gnet_urls) == 1 else f'--gnet #{k + 1}')[0])
    if distributed.is_main():
        distributed.barrier()
    for n in [net] + gnets:
        n.requires_grad_(False)
    return net, encoder, gnets


@click.command(epilog=EXAMPLES, context_settings=dict(help_option_names=['-h', '--help'], max_content_width=110))
@click.option('--preset', help='Configuration preset from configs/generate.toml', metavar='STR')
@click.option('--net', help='Main network: path or URL (native .safetensors or published .pkl)', metavar='PATH|URL')
@click.option('--gnet', multiple=True, help='Guiding network (repeat for several guides)', metavar='PATH|URL')
@click.option('--guidance', help='Guidance weight w (1 = no guidance)', metavar='FLOAT', type=float, default=1.0,
              show_default=True)
@click.option('--guide-weights', help='Shares a_k of several guides (>= 0, sum 1) [default: equal]',
              metavar='LIST', type=FloatList())
@click.option('--guidance-interval', help='Guide only when LO < sigma <= HI', metavar='LO,HI',
              type=FloatList(length=2))
@click.option('--outdir', help='Where to save the images', metavar='DIR')
@click.option('--subdirs', help='Create a subdirectory for every 1000 seeds', is_flag=True)
@click.option('--seeds', help='List of random seeds (e.g. 1,2,5-10)', metavar='LIST', type=IntList(),
              default='0-63', show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'batch_size', help='Maximum batch size per process', metavar='INT',
              type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--steps', 'num_steps', help='Number of sampling steps', metavar='INT', type=click.IntRange(min=1),
              default=32, show_default=True)
@click.option('--sigma_min', help='Lowest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=0.002, show_default=True)
@click.option('--sigma_max', help='Highest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=80, show_default=True)
@click.option('--rho', help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=7, show_default=True)
@click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0),
              default=0, show_default=True)
@click.option('--S_min', 'S_min', help='Stochastic min noise level', metavar='FLOAT', type=click.FloatRange(min=0),
              default=0, show_default=True)
@click.option('--S_max', 'S_max', help='Stochastic max noise level', metavar='FLOAT', type=click.FloatRange(min=0),
              default='inf', show_default=True)
@click.option('--S_noise', 'S_noise', help='Stochastic noise inflation', metavar='FLOAT', type=float, default=1,
              show_default=True)
@click.option('--device', help='Device (cpu, cuda, cuda:1, ...)  [default: cuda if available]', metavar='STR')
@click.option('--grid', help='Also write all images as one contact-sheet PNG', metavar='FILE')
@click.option('--skip-existing', help='Skip seeds whose PNG already exists in --outdir (resume)', is_flag=True)
@click.option('--npz', help='Also write all images as an ADM sample batch (arr_0 NHWC uint8, arr_1 labels)',
              metavar='FILE')
@click.pass_context
def main(ctx, preset, net, gnet, guidance, guide_weights, guidance_interval, outdir, subdirs, seeds, class_idx,
         batch_size, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, device, grid,
         skip_existing, npz):
    """Generate images with an EDM2 network, optionally guided by one or more guiding networks.

    Seeds give the same images as the published generate_images.py. A --preset supplies --net, --gnet,
    --guidance (and --guidance-interval); flags given explicitly override it.
    """
    explicit = lambda name: ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)

    # Preset values fill in whatever was not given on the command line.
    if preset is not None:
        try:
            cfg = presets.get('generate', preset)
        except presets.PresetError as e:
            raise click.BadParameter(str(e), param_hint="'--preset'") from None
        if not explicit('net'):
            net = cfg.get('net')
        if not explicit('gnet') and cfg.get('gnet'):
            gnet = (cfg['gnet'],) if isinstance(cfg['gnet'], str) else tuple(cfg['gnet'])
        if not explicit('guidance'):
            guidance = float(cfg.get('guidance', 1.0))
        if not explicit('guidance_interval') and cfg.get('guidance_interval') is not None:
            guidance_interval = [float(v) for v in cfg['guidance_interval']]
        if not explicit('guide_weights') and cfg.get('guide_weights') is not None:
            guide_weights = [float(v) for v in cfg['guide_weights']]
    if net is None:
        raise click.UsageError('give --net or --preset')
    if outdir is None and grid is None and npz is None:
        raise click.UsageError('give --outdir, --grid, --npz, or several')
    if npz is not None and skip_existing:
        raise click.UsageError('--npz needs every image: it cannot be combined with --skip-existing')
    if skip_existing and outdir is None:
        raise click.UsageError('--skip-existing needs --outdir')
    if not seeds:
        raise click.BadParameter('no seeds', param_hint="'--seeds'")
    if not math.isfinite(guidance):
        raise click.BadParameter(f'must be finite, got {guidance}', param_hint="'--guidance'")
    if guidance != 1 and not gnet:
        raise click.UsageError(f'--guidance {guidance:g} needs a guiding network (--gnet)')
    gnet_urls = list(gnet) if guidance != 1 else []  # w = 1 never evaluates a guide: do not even load it
    try:
        sampling.check_interval(guidance_interval)
        if gnet_urls:
            sampling.guide_weights_for(len(gnet_urls), guide_weights)
    except sampling.SamplingError as e:
        hint = "'--guidance-interval'" if 'interval' in str(e) else "'--guide-weights'"
        raise click.BadParameter(str(e), param_hint=hint) from None

    # Load and check everything before the first file is written.
    device = distributed.init(device)
    net_, encoder, gnets = _load_all(net, gnet_urls, device)
    sampler_kwargs = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                          S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
    skip = None
    if skip_existing:
        skip = lambda seed: os.path.isfile(image_path(outdir, seed, subdirs))
    for url, g in zip(gnet_urls, gnets):
        try:
            sampling.check_guides(net_, [g])
        except sampling.SamplingError as e:
            raise click.ClickException(f'--gnet {url}: {str(e).replace("guiding network 1", "guiding network")}') from None
    from edm2.encoders import EncoderError
    try:
        batches = sampling.generate(net_, seeds, encoder=encoder, gnets=gnets, guidance=guidance,
                                    guide_weights=guide_weights if gnets else None,
                                    guidance_interval=guidance_interval if gnets else None,
                                    class_idx=class_idx, batch_size=batch_size, device=device, skip=skip,
                                    progress=True, **sampler_kwargs)
    except sampling.SamplingError as e:
        if str(e).startswith('class'):
            raise click.BadParameter(str(e), param_hint="'--class'") from None
        raise click.ClickException(str(e)) from None
    except EncoderError as e:
        raise click.ClickException(f'--net {net}: {e}') from None

    guided = f', guidance {guidance:g} with {len(gnets)} guide(s)' if gnets else ''
    distributed.print0(f'Generating {len(seeds)} images{guided} on {distributed.get_world_size()} process(es)'
                       + (f' to "{outdir}"' if outdir else '') + ' ...')
    kept = {}  # seed -> HWC uint8, for --grid
    sink = SampleBatchSink(npz, seeds) if npz is not None else None  # --npz: streamed, never all in memory
    with torch.no_grad():
        written = _write_batches(sink.tee(batches) if sink else batches, outdir, subdirs, skip, grid, kept)
    if sink is not None:
        sink.finish()
        distributed.print0(f'Wrote an ADM sample batch of {len(seeds)} images to "{npz}"')
    distributed.barrier()
    if grid is not None:
        _write_grid(grid, kept, seeds, outdir, subdirs)
    total = torch.tensor([written], dtype=torch.int64, device=device if device.type == 'cuda' else 'cpu')
    distributed.all_reduce_sum(total)
    distributed.print0(f'Done: {int(total.item())} images written.')
    distributed.barrier()
    distributed.shutdown()


def _write_batches(batches, outdir, subdirs, skip, grid, kept):
    written = 0
    for batch in batches:
        for seed, image in zip(batch.seeds, batch.images):
            pil = None
            if outdir is not None:
                path = image_path(outdir, seed, subdirs)
                if not (skip is not None and skip(seed)):
                    pil = _to_pil(image)
                    write_png_atomic(path, pil)
                    written += 1
            if grid is not None:
                kept[seed] = image.permute(1, 2, 0).cpu().numpy()
    return written


def _write_grid(grid, kept, seeds, outdir, subdirs):
    import PIL.Image
    parts = _gather_to_rank0(kept)
    if not distributed.is_main():
        return
    everything = {}
    for part in parts:
        everything.update(part)
    images = []
    for seed in seeds:
        if seed not in everything:  # skipped with --skip-existing: read it back from disk
            array = np.array(PIL.Image.open(image_path(outdir, seed, subdirs)))
            everything[seed] = array[:, :, None] if array.ndim == 2 else array
        images.append(everything[seed])
    sheet = make_grid(images)
    write_png_atomic(grid, PIL.Image.fromarray(sheet[:, :, 0] if sheet.shape[2] == 1 else sheet))
    print(f'Wrote a grid of {len(images)} images to "{grid}"')


if __name__ == '__main__':
    main()
