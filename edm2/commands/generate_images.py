"""Generate images with EDM2 networks, optionally guided (autoguidance, classifier-free guidance, a guidance
interval, several guides at once). See `python generate_images.py --help`.

The published tool's flags, seeds and file names: `--seeds 0-49999` writes the images (`{seed:06d}.png`)
the published release writes for those seeds. Runs on CPU, one GPU, or `torchrun --nproc_per_node=N
generate_images.py ...` (the seeds are split over the processes as the published tool splits them).
"""

import math
import os
import re

import click
import numpy as np
import PIL.Image
import torch

from edm2 import distributed, generation, runtime, sampling
from edm2.commands import cli, guidance_setup, text_images
from edm2.fileio import atomic_write, atomic_write_text, is_complete_png
from edm2.limits import SEED_MAX
from edm2.metrics.adm_npz import SampleBatchSink
from edm2 import jsontext

EXAMPLES = """
\b
Examples:
  # 64 images with a published preset (the networks are downloaded once into ~/.cache/edm2)
  python generate_images.py --preset edm2-img512-s-autog-fid --outdir out --seeds 0-63
\b
  # Autoguidance with your own networks: a main net, a smaller/shorter-trained guide, weight 2.1
  python generate_images.py --net main.safetensors --gnet guide.safetensors --guidance 2.1 --outdir out
\b
  # Guidance only in an interval, by noise level or by step (the same steps at 32 steps)
  python generate_images.py --preset edm2-img512-xxl-guid-fid --guidance 2 \\
      --guidance-interval 0.19,1.61 --outdir out
  python generate_images.py --preset edm2-img512-xxl-guid-fid --guidance 2 \\
      --guidance-interval-steps 17,22 --outdir out
\b
  # Two guides at once (unconditional net and early small net), extra weight split 30/70
  python generate_images.py --net main.pkl --gnet uncond.pkl --gnet early.pkl \\
      --guide-weights 0.3,0.7 --guidance 2.0 --outdir out
\b
  # Perturbed-attention guidance (the main net guides itself), alone or mixed with a real guide,
  # with adaptive projected guidance as the rule
  python generate_images.py --net main.pkl --gnet self:pag --guidance 2.5 --outdir out
  python generate_images.py --net main.pkl --gnet xs.pkl --gnet self:pag --guide-weights 0.5,0.5 \\
      --guidance 2 --guidance-rule apg:eta=0,momentum=-0.5,threshold=15 --outdir out
\b
  # 50k class-balanced images for FID on 8 GPUs, resumable, with the class of every image
  torchrun --nproc_per_node=8 generate_images.py --preset edm2-img512-xxl-fid --outdir out \\
      --subdirs --seeds 0-49999 --labels balanced --labels-out out/labels.json --skip-existing
\b
  # bfloat16 arithmetic (any device) and a compiled network: faster, images within a few levels
  python generate_images.py --preset edm2-img512-s-fid --precision bf16 --compile --outdir out
\b
  # A contact sheet of the first 64 seeds
  python generate_images.py --preset edm2-img64-s-fid --seeds 0-63 --grid grid.png
\b
  # DeepFloyd IF as in the autoguidance paper: IF-I-XL guided by IF-I-M and by CFG, then stage II
  python generate_images.py --preset if-xl-autog-m --prompt "a red fox in the snow" --seeds 0-3 --outdir out
"""

GRID_MAX = 4096  # a contact sheet holds every image in memory
LABEL_BYTES = 128  # --labels-out: (position, seed, class) of one image and its entry in the JSON


class SeedsType(click.ParamType):
    """'0-3,7,10-11' -> the seeds 0, 1, 2, 3, 7, 10, 11 as lazy ranges (huge ranges cost no memory)."""
    name = 'LIST'

    def convert(self, value, param, ctx):
        if isinstance(value, generation.SeedRanges):
            return value
        try:
            return parse_seeds(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def parse_seeds(text) -> generation.SeedRanges:
    """'0-3,7' -> SeedRanges([range(0, 4), range(7, 8)]); ValueError with a one-line reason otherwise."""
    ranges = []
    for part in str(text).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m:
            raise ValueError(f'expected non-negative integers or ranges like 0-63, separated by commas; got {part!r}')
        first = int(m[1])
        last = int(m[2]) if m[2] is not None else first
        if last < first:
            raise ValueError(f'empty range {part.strip()!r} (end before start)')
        if last > SEED_MAX:
            raise ValueError(f'seed {last} in {part.strip()!r} is too large; seeds lie in [0, {SEED_MAX}]')
        ranges.append(range(first, last + 1))
    if sum((r.stop - r.start for r in ranges)) > SEED_MAX:  # len() of a longer list overflows
        raise ValueError(f'{text!r} holds more than {SEED_MAX} seeds')
    return generation.SeedRanges(ranges)


class UpperLevel(cli.Float):
    """A non-negative level that may also be 'inf' (no upper limit)."""

    def convert(self, value, param, ctx):
        if str(value).strip().lower() in ('inf', '+inf', 'infinity'):
            return math.inf
        return super().convert(value, param, ctx)


def image_path(outdir, seed, subdirs):
    """Where the image of `seed` goes: {seed:06d}.png, under {seed//1000*1000:06d}/ with --subdirs."""
    name = f'{seed:06d}.png'
    return os.path.join(outdir, f'{seed // 1000 * 1000:06d}', name) if subdirs else os.path.join(outdir, name)


def to_pil(image):
    """uint8 [C, H, W] -> PIL image (C = 1 or 3)."""
    array = image.permute(1, 2, 0).cpu().numpy()
    if array.shape[2] not in (1, 3):
        cli.fail(f'cannot write {array.shape[2]}-channel images as PNG (a latent network needs its encoder)')
    return PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def write_png(path, pil_image):
    """Write under a temporary name in the same folder, then rename: never a half-written file."""
    with atomic_write(path) as f:
        pil_image.save(f, format='PNG')


def make_grid(images):
    """uint8 [H, W, C] arrays of one shape -> one sheet, ⌈√n⌉ columns, filled row by row."""
    h, w, c = images[0].shape
    cols = max(math.ceil(math.sqrt(len(images))), 1)
    rows = math.ceil(len(images) / cols)
    sheet = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        sheet[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return sheet


# ----------------------------------------------------------------------------------------------------
# The command.

@click.command(cls=cli.Command, epilog=EXAMPLES, context_settings=dict(help_option_names=['-h', '--help'], max_content_width=110))
@guidance_setup.guidance_options
@cli.vae_option
@click.option('--outdir', metavar='DIR', help='Folder that receives one PNG per seed.')
@click.option('--subdirs', is_flag=True, help='Group the PNGs in folders of 1000 seeds (000000/, 001000/, ...).')
@click.option('--seeds', metavar='LIST', type=SeedsType(), default='0-63', show_default=True,
              help='Seeds to generate, one image each: numbers and ranges such as 0-9,20,100-199.')
@click.option('--class', 'class_idx', metavar='INT', type=cli.Int(0),
              help='Give every image this class.  [default: see --labels]')
@click.option('--labels', 'label_rule', type=click.Choice(generation.CLASS_RULES), default='random', show_default=True,
              help="How classes are chosen for a conditional net: 'random' draws each from its seed's random "
                   "stream (the published images); 'balanced' cycles through the classes by the seed's "
                   "position in --seeds, so every class appears equally often (within one).")
@click.option('--labels-out', metavar='JSON',
              help='Also write the class of every image, as {"labels": [[file, class], ...]}.')
@click.option('--batch', 'batch_size', metavar='INT', type=cli.Int(1, 65536), default=32, show_default=True,
              help='Images sampled together by each process.')
@click.option('--steps', 'num_steps', metavar='INT', type=cli.Int(1, 100000, item_bytes=16, item='step'), default=32, show_default=True,
              help='Heun steps N (2N - 1 network evaluations per image).')
@click.option('--sigma_min', metavar='FLOAT', type=cli.Float(0, 1e5, lo_open=True), default=0.002, show_default=True,
              help='Noise level of the last step before 0.')
@click.option('--sigma_max', metavar='FLOAT', type=cli.Float(0, 1e5, lo_open=True), default=80.0, show_default=True,
              help='Noise level the sampling starts from.')
@click.option('--rho', metavar='FLOAT', type=cli.Float(0.01, 1000), default=7.0, show_default=True,
              help='Shape of the schedule: larger values take smaller steps near sigma_min.')
@click.option('--S_churn', 'S_churn', metavar='FLOAT', type=cli.Float(0, 1e6), default=0.0, show_default=True,
              help='Amount of fresh noise added during sampling; 0 is the deterministic sampler.')
@click.option('--S_min', 'S_min', metavar='FLOAT', type=cli.Float(0, 1e5), default=0.0, show_default=True,
              help='Lowest noise level at which noise is added.')
@click.option('--S_max', 'S_max', metavar='FLOAT', type=UpperLevel(0), default='inf', show_default=True,
              help="Highest noise level at which noise is added ('inf': no limit).")
@click.option('--S_noise', 'S_noise', metavar='FLOAT', type=cli.Float(0, 10), default=1.0, show_default=True,
              help='Scale of the added noise relative to the amount that keeps the level exact.')
@click.option('--device', metavar='STR', help='Where to run, e.g. cpu, cuda, cuda:1.  [default: cuda if present]')
@click.option('--grid', metavar='FILE', help=f'Also lay all images out on one PNG sheet (at most {GRID_MAX}).')
@click.option('--skip-existing', is_flag=True, help='Leave seeds whose PNG is already in --outdir alone (resume).')
@click.option('--npz', metavar='FILE', help='Also write all images as an ADM sample batch (arr_0 NHWC uint8, '
                                           'arr_1 labels), streamed to disk, for the ADM TensorFlow evaluator.')
@text_images.text_options  # text-to-image models (diffusers:), the solver and the schedule
@cli.network_run_options
@cli.one_line_errors  # e.g. a full disk (edm2.fileio.NoSpaceError): one line naming the file
def main(preset, net, gnet, guidance, guide_weights, guidance_interval, guidance_interval_steps, guidance_rule, outdir,
         subdirs, seeds, class_idx, label_rule, labels_out, batch_size, num_steps, sigma_min, sigma_max, rho, S_churn,
         S_min, S_max, S_noise, device, grid, skip_existing, npz, prompts, prompt_file, negative_prompt, solver,
         schedule, stage2, stage3, precision, compile_unet):
    """Sample images from an EDM2 network, optionally steered by one or more guiding networks.

    A seed gives the image the published generate_images.py gives it. --preset supplies the networks,
    the guidance weight and interval; flags given on the command line replace the preset's values.
    A guided step uses the guides in both of its network evaluations; the interval flags choose the steps.
    """
    setup = guidance_setup.resolve(preset, net, gnet, guidance, guide_weights, guidance_interval,
                                   guidance_interval_steps, guidance_rule)
    if text_images.is_text_run(setup):
        return text_images.run(setup, dict(locals()))
    text_images.refuse_for_edm2(setup, prompts, prompt_file, schedule, stage2, stage3)
    _check_flags(outdir, grid, npz, skip_existing, seeds, class_idx, label_rule, labels_out)
    options = sampling.HeunOptions(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, solver=solver)
    try:
        sigmas = sampling.edm_schedule(num_steps, sigma_min, sigma_max, rho, dtype=options.dtype)
    except sampling.SamplingError as e:
        cli.fail(e, '--sigma_min/--sigma_max/--rho/--steps')
    guidance_setup.check_schedule(setup, sigmas)
    for path, flag, folder in ((outdir, '--outdir', True), (grid, '--grid', False), (labels_out, '--labels-out', False),
                               (npz, '--npz', False)):
        if path is not None:
            cli.check_output(path, flag, folder)
    try:
        device = distributed.init(device)
    except distributed.DeviceError as e:
        cli.fail(e)
    if outdir is not None:
        cli.hold_for_command(outdir)  # one run per folder, until the command ends

    net_, encoder, guides = guidance_setup.load_networks(setup, device)
    cli.check_memory('--batch', batch_size, generation.image_bytes(net_, encoder), 'image', device)
    skip = (lambda seed: is_complete_png(image_path(outdir, seed, subdirs))) if skip_existing else None
    classes = class_idx if class_idx is not None else label_rule
    if labels_out is not None and not net_.label_dim:
        cli.fail('the network is unconditional (label_dim 0): there are no labels to write', '--labels-out')
    try:
        batches = generation.generate(net_, seeds, guidance=guides, sigmas=sigmas, options=options, classes=classes,
                                      encoder=encoder, batch_size=batch_size, device=device, skip=skip, progress=True)
    except sampling.SamplingError as e:
        cli.fail(e, '--class' if class_idx is not None else '--labels' if label_rule != 'random' else None)
    except ValueError as e:  # the encoder could not be set up (e.g. the VAE extra is missing)
        cli.fail(e, f'--net {setup.net}')

    guided = f', guidance {setup.weight:g} ({setup.rule}) with {len(setup.gnets)} guide(s)' if setup.gnets else ''
    distributed.print0(f'Generating {len(seeds)} images{guided} on {distributed.get_world_size()} process(es)'
                       + (f' to "{outdir}"' if outdir else '') + ' ...')
    kept, labels = {}, []
    sink = SampleBatchSink(npz, seeds) if npz is not None else None  # --npz: streamed, never all in memory
    with torch.no_grad(), runtime.running(cli.run_settings(precision, compile_unet)):
        try:
            written = _write_batches(sink.tee(batches) if sink else batches, outdir, subdirs, skip,
                                     grid is not None, kept, labels)
        except sampling.SamplingError as e:
            cli.fail(e)
    if sink is not None:
        sink.finish()
        distributed.print0(f'Wrote an ADM sample batch of {len(seeds)} images to "{npz}"')
    distributed.barrier()
    if grid is not None:
        _write_grid(grid, kept, seeds, outdir, subdirs)
    if labels_out is not None:
        _write_labels(labels_out, labels, subdirs)
    total = torch.tensor([written], dtype=torch.int64, device=device if device.type == 'cuda' else 'cpu')
    distributed.all_reduce_sum(total)
    outputs = ([f'{int(total.item())} images to "{outdir}"'] if outdir is not None else []) + \
              ([f'a grid of {len(seeds)} images to "{grid}"'] if grid is not None else []) + \
              ([f'labels to "{labels_out}"'] if labels_out is not None else []) + \
              ([f'the sample batch to "{npz}"'] if npz is not None else [])
    distributed.print0(f'Done: wrote {", ".join(outputs)}.')
    distributed.barrier()
    distributed.shutdown()


def _check_flags(outdir, grid, npz, skip_existing, seeds, class_idx, label_rule, labels_out):
    if outdir is None and grid is None and npz is None:
        raise click.UsageError('give --outdir, --grid, --npz, or several')
    if npz is not None and skip_existing:
        raise click.UsageError('--npz needs every image: it cannot be combined with --skip-existing')
    if skip_existing and outdir is None:
        raise click.UsageError('--skip-existing needs --outdir')
    if len(seeds) == 0:
        raise click.BadParameter('no seeds', param_hint="'--seeds'")
    if labels_out is not None:  # the class of every seed is held until the end
        cli.check_memory('--seeds', len(seeds), LABEL_BYTES, 'labelled image')
    if grid is not None and len(seeds) > GRID_MAX:
        raise click.BadParameter(f'a contact sheet holds at most {GRID_MAX} images; --seeds gives {len(seeds)}',
                                 param_hint="'--grid'")
    if class_idx is not None and label_rule != 'random':
        raise click.UsageError(f'give --class or --labels {label_rule}, not both')


def _write_batches(batches, outdir, subdirs, skip, keep_for_grid, kept, labels):
    """Write this rank's images; collect (position, seed, class) for --labels-out and images for --grid."""
    written = 0
    for batch in batches:
        if batch.labels is not None:
            labels += zip(batch.positions, batch.seeds, batch.labels.tolist())
        if batch.images is None:  # every seed of the batch exists already
            continue
        for seed, image in zip(batch.seeds, batch.images):
            if outdir is not None and not (skip is not None and skip(seed)):
                write_png(image_path(outdir, seed, subdirs), to_pil(image))
                written += 1
            if keep_for_grid:
                kept[seed] = image.permute(1, 2, 0).cpu().numpy()
    return written


def _write_grid(grid, kept, seeds, outdir, subdirs):
    parts = distributed.gather_to_main(kept)
    if not distributed.is_main():
        return
    everything = {seed: image for part in parts for seed, image in part.items()}
    images = []
    for seed in seeds:
        if seed not in everything:  # skipped with --skip-existing: read it back
            array = np.array(PIL.Image.open(image_path(outdir, seed, subdirs)))
            everything[seed] = array[:, :, None] if array.ndim == 2 else array
        images.append(everything[seed])
    sheet = make_grid(images)
    write_png(grid, PIL.Image.fromarray(sheet[:, :, 0] if sheet.shape[2] == 1 else sheet))
    print(f'Wrote a grid of {len(images)} images to "{grid}"')


def _write_labels(path, labels, subdirs):
    """{"labels": [[file name relative to --outdir, class], ...]} in seed-list order (the dataset.json layout
    of dataset_tool.py, so the folder can serve as a labelled dataset)."""
    parts = distributed.gather_to_main(labels)
    if not distributed.is_main():
        return
    rows = sorted(row for part in parts for row in part)
    entries = [[image_path('', seed, subdirs).replace(os.sep, '/'), label] for _, seed, label in rows]
    atomic_write_text(path, jsontext.dumps({'labels': entries}))
    print(f'Wrote the classes of {len(entries)} images to "{path}"')


if __name__ == '__main__':
    main()
