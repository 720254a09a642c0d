"""Compute FID, FD_DINOv2, precision and recall: reference statistics (`ref`), a folder of images
(`calc`) or a network sampled on the fly (`gen`). See `python calculate_metrics.py COMMAND --help`.
`--protocol adm` computes the ADM evaluator's FID, sFID, Inception Score, precision and recall instead
(against ADM reference batches such as VIRTUAL_imagenet512.npz), and `ref --protocol adm` writes one.

Runs on CPU, one GPU, or `torchrun --nproc_per_node=N` (the images are split over the ranks and the
statistics summed). Detector weights: see `--inception-weights` / `--dinov2-weights`. `sweep` tunes
autoguidance (main EMA length x guide EMA length x guidance weight).

This file declares the options and puts the steps in order; the work is done in `edm2.metrics`: inputs
(detectors, references), dataset_features / network_features (images -> feature statistics),
dataset_reference (`ref` outputs), report (metric values, table, JSON); `sweep` in `edm2.sweep`.
"""

import os

import click
import numpy as np

from edm2 import distributed, generation, runtime, sampling, self_guides
from edm2.commands import cli as edm2_cli
from edm2.commands import guidance_setup
from edm2.commands.cli import one_line_errors, parse_number_list
from edm2.metrics import adm, dataset_features, dataset_reference, evaluate, inputs, network_features, report
from edm2.metrics.report import DEFAULT_METRICS, PROTOCOLS
from edm2.phema import SIGMA_REL_MAX, SIGMA_REL_MIN
from edm2.sweep import report as sweep_report
from edm2.sweep import run as sweep_lib
from edm2.sweep import source as sweep_source

# ----------------------------------------------------------------------------------------------------
# Helpers: library calls with the settings every command shares


def _metrics(text, protocol='edm2'):
    """--metrics -> list (report.parse_metrics), refused as a bad --metrics value."""
    try:
        return report.parse_metrics(text, protocol)
    except evaluate.MetricError as e:
        raise click.BadParameter(str(e), param_hint="'--metrics'") from None


def _load_detectors(names, opts, device):
    return inputs.load_detectors(names, device, inception_weights=opts['inception_weights'],
                                 dinov2_weights=opts['dinov2_weights'], resize_mode=opts['dinov2_resize'])


def _evaluate(stats, reference, metrics, opts, seed, device):
    return report.evaluate_run(stats, reference, metrics, opts['pr_features'], opts['adm_distances'], seed, device)


def _accumulate(dataset, positions, detectors, opts, device, desc, **kwargs):
    return dataset_features.accumulate_dataset(dataset, positions, detectors, device, batch=opts['batch'],
                                               workers=opts['workers'], desc=desc, **kwargs)


def _check_batch(opts, count):
    """--batch against memory, for the images a batch will hold: never more than the `count` there are."""
    edm2_cli.check_memory('--batch', min(opts['batch'], count), DETECTOR_IMAGE_BYTES, 'image')


# ----------------------------------------------------------------------------------------------------
# Command line

# Memory (lower estimates) per image of a detector batch (Inception's 299x299 RGB input in float32, twice), per
# kept feature vector (Inception 2048 + DINOv2 1024 float32 values), per evaluated image (its position, its
# class, its precision/recall features when asked for). A detector batch, the kept features and the ADM
# reference images are checked once the dataset is open, for the count there will be (at most its size).
DETECTOR_IMAGE_BYTES = 2 * 3 * 299 * 299 * 4
FEATURE_BYTES = (2048 + 1024) * 4
WORKER_BYTES = 64 << 20  # a data loader worker: a process of its own (lower estimate of its private memory)


def _image_bytes(p):
    names = (p.get('metrics') or DEFAULT_METRICS).split(',')
    return 16 + (FEATURE_BYTES if any(n.strip() in evaluate.PR_METRICS for n in names) else 0)


def _count(lo, item_bytes=None, item='image', hi=None):
    return edm2_cli.Int(lo, hi, item_bytes=item_bytes, item=item)


def common_options(fn):
    opts = [
        click.option('--batch', help='Batch size per process', metavar='INT', type=_count(1),
                     default=64, show_default=True),
        click.option('--workers', help='Data loader worker processes', metavar='INT', type=_count(0, WORKER_BYTES, 'worker process'),
                     default=2, show_default=True),
        click.option('--device', help='Device (default: cuda if available, else cpu)', metavar='STR', default=None),
        click.option('--inception-weights', help='Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth); '
                     'else $EDM2_INCEPTION_WEIGHTS, the cache, or a download', metavar='PATH', default=None),
        click.option('--dinov2-weights', help='DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth); '
                     'else $EDM2_DINOV2_WEIGHTS, the cache, or a download', metavar='PATH', default=None),
        click.option('--dinov2-resize', help="DINOv2 resize to 224: 'torch' (bicubic antialiased, fast) or "
                     "'pil' (PIL bicubic, exact, slow)", type=click.Choice(['torch', 'pil']), default='torch',
                     show_default=True),
        click.option('--pr-features', help='Features for precision/recall', type=click.Choice(['dinov2', 'inception']),
                     default='dinov2', show_default=True),
        click.option('--protocol', help="'adm': the ADM evaluator's metrics and reference batches (.npz) instead "
                     "of the EDM2 papers'", type=click.Choice(PROTOCOLS), default='edm2', show_default=True),
        click.option('--adm-distances', help='Precision of the distances of adm_precision/adm_recall (float16 '
                     'with float32 fallback, as the ADM evaluator)', type=click.Choice(['float16', 'float32']),
                     default='float16', show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.group(cls=edm2_cli.Group)
def cli():
    """Calculate FID, FD_DINOv2, precision and recall of generated images.

    \b
    Reference statistics of a dataset:
      python calculate_metrics.py ref --data=datasets/img512.zip --dest=refs/img512.pkl
    Metrics of a folder of images against published statistics:
      python calculate_metrics.py calc --images=out --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl
    Metrics of a network, generating on the fly (the papers' protocol: 3 x 50k images, minimum):
      torchrun --nproc_per_node=8 calculate_metrics.py gen --preset=edm2-img512-s-autog-fid \\
          --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl --repeats=3
    The ADM evaluator's FID, sFID, IS, precision and recall (DiT-family papers), against its reference batch:
      python calculate_metrics.py calc --images=out --protocol=adm --ref=VIRTUAL_imagenet512.npz
    """


@cli.command()
@click.option('--data', 'data', help='Dataset folder or ZIP of images', metavar='PATH', required=True)
@click.option('--dest', help='Output statistics file (.pkl)', metavar='PKL', required=True)
@click.option('--metrics', help=f'Statistics to compute (comma-separated: {", ".join(evaluate.METRICS)})  '
              f'[default: {DEFAULT_METRICS}]', metavar='LIST', default=None)
@click.option('--keep-features', help='Also store features (needed for precision/recall)', is_flag=True)
@click.option('--keep-num', help='Store at most this many features (seeded random subset)', metavar='INT',
              type=_count(1), default=50000, show_default=True)
@click.option('--seed', help='Seed of the stored feature subset (and of the ADM reference images)', metavar='INT',
              type=int, default=0, show_default=True)
@click.option('--ref-images', help='--protocol adm: images stored as arr_0 (seeded random subset)', metavar='INT',
              type=_count(4), default=10000, show_default=True)
@common_options
@one_line_errors
def ref(data, dest, metrics, keep_features, keep_num, seed, ref_images, **opts):
    """Compute reference statistics of a dataset.

    \b
    Examples:
      python calculate_metrics.py ref --data=datasets/img512.zip --dest=refs/img512.pkl
      python calculate_metrics.py ref --data=datasets/img64.zip --dest=refs/img64-pr.pkl \\
          --metrics=fid,fd_dinov2,precision,recall --keep-features
      python calculate_metrics.py ref --protocol=adm --data=datasets/img512.zip --dest=refs/img512-adm.npz
    """
    edm2_cli.check_output(dest, '--dest')  # before the statistics are computed
    if opts['protocol'] == 'adm':
        return _adm_ref(data, dest, seed, ref_images, opts)
    metrics = _metrics(metrics)
    device = distributed.init(opts['device'])
    dataset = dataset_features.open_dataset(data, 'dataset')
    names = evaluate.detectors_for(metrics, opts['pr_features'])
    keep = set(names) if keep_features else set()
    if any(m in evaluate.PR_METRICS for m in metrics):
        keep.add(opts['pr_features'])
    n = len(dataset)
    _check_batch(opts, n)
    if keep:
        edm2_cli.check_memory('--keep-num', min(keep_num, n), FEATURE_BYTES, 'feature vector')
    detectors = _load_detectors(names, opts, device)
    distributed.print0(f'Computing reference statistics of {n} images in {data} ({", ".join(names)})...')
    stats = _accumulate(dataset, np.arange(n), detectors, opts, device, 'Reference', keep=keep,
                        keep_slots=dataset_features.kept_slots(n, keep_num, seed) if keep else None)
    if distributed.is_main():
        dataset_reference.save_edm2_reference(dest, stats, metrics, data)
        distributed.print0(f'Saved statistics of {n} images to {dest}')
    distributed.barrier()


def _adm_ref(data, dest, seed, ref_images, opts):
    """`ref --protocol adm`: an ADM reference batch (.npz) of a dataset: `ref_images` images drawn with
    `seed` as arr_0, and mu, sigma, mu_s, sigma_s of the whole dataset."""
    device = distributed.init(opts['device'])
    dataset = dataset_features.open_dataset(data, 'dataset')
    n = len(dataset)
    _check_batch(opts, n)
    edm2_cli.check_memory('--ref-images', min(ref_images, n), dataset.resolution ** 2 * dataset.num_channels)
    detectors = _load_detectors(['inception'], opts, device)
    distributed.print0(f'Computing ADM reference statistics of {n} images in {data}...')
    stats = _accumulate(dataset, np.arange(n), detectors, opts, device, 'Reference', extra=[adm.SPATIAL])
    if distributed.is_main():
        stored = dataset_reference.save_adm_reference(dest, dataset, stats, ref_images, seed, data)
        distributed.print0(f'Saved an ADM reference batch ({stored} images, statistics of {n}) to {dest}')
    distributed.barrier()


def evaluation_options(fn):
    """--ref, --metrics and --num, shared by `calc` and `gen`. --num-images: under torchrun 2.13+ a bare --num
    is refused as an ambiguous prefix of torchrun's own --numa-binding."""
    for option in reversed([
        click.option('--ref', 'ref_path', help='Reference statistics (.pkl, .npz, or URL)', metavar='PKL|NPZ|URL',
                     required=True),
        click.option('--metrics', help=f'Metrics (comma-separated: {", ".join(evaluate.METRICS)})  [default: '
                     f'{DEFAULT_METRICS}; with --protocol adm: {",".join(adm.METRICS)}]', metavar='LIST', default=None),
        click.option('--num', '--num-images', 'num', help='Number of images per evaluation', metavar='INT',
                     type=_count(2, _image_bytes), default=50000, show_default=True),
    ]):
        fn = option(fn)
    return fn


@cli.command()
@click.option('--images', help='Folder or ZIP of images to evaluate', metavar='PATH', required=True)
@evaluation_options
@click.option('--seed', help='Seed of the random subset when the folder holds more images', metavar='INT',
              type=int, default=0, show_default=True)
@click.option('--repeats', help='Evaluate this many disjoint subsets; report each, min and mean', metavar='INT',
              type=_count(1, lambda p: 16 * p['num'], 'repeat'), default=1, show_default=True)
@click.option('--out', help='Write results and settings as JSON', metavar='JSON', default=None)
@common_options
@one_line_errors
def calc(images, ref_path, metrics, num, seed, repeats, out, **opts):
    """Calculate metrics of a folder of images.

    \b
    Examples:
      python calculate_metrics.py calc --images=out --ref=refs/img512.pkl --num=50000
      python calculate_metrics.py calc --images=out --ref=refs/img64-pr.pkl \\
          --metrics=fid,precision,recall --num=50000 --repeats=3 --out=metrics.json
    """
    metrics = _metrics(metrics, opts['protocol'])
    if out is not None:
        edm2_cli.check_output(out, '--out')  # before the statistics are computed
    device = distributed.init(opts['device'])
    if not report.is_adm(metrics):
        reference = inputs.load_checked_reference(ref_path, metrics, opts['pr_features'])
    dataset = dataset_features.open_dataset(images, 'image folder')
    subsets = dataset_features.subsets(len(dataset), num, repeats, seed, images)
    _check_batch(opts, num)
    detectors = _load_detectors(evaluate.detectors_for(metrics, opts['pr_features']), opts, device)
    keep, extra = report.kept_features(metrics, opts['pr_features'])
    if report.is_adm(metrics):
        reference = inputs.load_adm_reference(ref_path, metrics, detectors, opts['batch'], device)

    runs, labels = [], []
    for r, positions in enumerate(subsets):
        distributed.print0(f'Evaluating {num} images of {images}' +
                           (f' (subset {r + 1}/{repeats})' if repeats > 1 else ''))
        stats = _accumulate(dataset, positions, detectors, opts, device, 'Features', keep=keep, extra=extra)
        if distributed.is_main():
            runs.append(_evaluate(stats, reference, metrics, opts, seed, device))
            labels.append(f'subset {r}' if repeats > 1 else os.path.basename(os.path.normpath(images)))
    if distributed.is_main():
        summary = report.report(runs, metrics, 'images', labels)
        report.write_json(out, report.record(
            'calc', detectors, opts, metrics=metrics, images=os.path.abspath(images), ref=str(ref_path), num=num,
            seed=seed, repeats=repeats, runs=[dict(subset=r, **v) for r, v in enumerate(runs)], summary=summary))
    distributed.barrier()


@cli.command()
@guidance_setup.guidance_options
@edm2_cli.vae_option
@evaluation_options
@click.option('--seed', help='First seed; evaluation r uses seeds seed + r*num ... seed + (r+1)*num - 1',
              metavar='INT', type=edm2_cli.Int(0), default=0, show_default=True)
@click.option('--repeats', help='Evaluate this many disjoint seed ranges; report each, min and mean', metavar='INT',
              type=_count(1, lambda p: 16 * p['num'], 'repeat'), default=1, show_default=True)
@click.option('--steps', help='Heun steps of the sampler', metavar='INT', type=_count(1, 16, 'step', hi=100000), default=32,
              show_default=True)
@click.option('--labels', 'label_rule', type=click.Choice(generation.CLASS_RULES), default='random', show_default=True,
              help="Classes of a conditional net: 'random' (each drawn from its seed's stream, the published "
                   "rule) or 'balanced' (every class equally often within one, by the seed's position in the range)")
@click.option('--out', help='Write results and settings (with the class of every image) as JSON', metavar='JSON',
              default=None)
@click.option('--save-npz', help='Also write the images as an ADM sample batch (arr_0 NHWC uint8, arr_1 labels); '
              'with --repeats, FILE-0.npz, FILE-1.npz, ...', metavar='FILE', default=None)
@common_options
@edm2_cli.network_run_options
@one_line_errors
def gen(preset, net, gnet, guidance, guide_weights, guidance_interval, guidance_interval_steps, guidance_rule, ref_path,
        metrics, num, seed, repeats, steps, label_rule, out, save_npz, precision, compile_unet, **opts):
    """Calculate metrics of a network, generating images on the fly.

    \b
    Examples:
      python calculate_metrics.py gen --net=snapshot.pkl --ref=refs/img64.pkl --num=50000
      torchrun --nproc_per_node=8 calculate_metrics.py gen --preset=edm2-img512-s-autog-fid \\
          --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl --repeats=3 --out=s-autog.json
      python calculate_metrics.py gen --net=s.pkl --gnet=xs-uncond.pkl --guidance=2.1 \\
          --guidance-interval=0.28,2.9 --labels=balanced --ref=refs/img512.pkl
      python calculate_metrics.py gen --preset=edm2-img512-xxl-guid-interval-fid --ref=refs/img512.pkl
      python calculate_metrics.py gen --net=s.pkl --gnet=self:pag --guidance=2 --guidance-rule=apg:eta=0 \\
          --ref=refs/img512.pkl
    """
    metrics = _metrics(metrics, opts['protocol'])
    setup = guidance_setup.resolve(preset, net, gnet, guidance, guide_weights, guidance_interval,
                                   guidance_interval_steps, guidance_rule)
    sigmas = sampling.edm_schedule(steps)
    guidance_setup.check_schedule(setup, sigmas)
    if out is not None:
        edm2_cli.check_output(out, '--out')
    _check_batch(opts, num)
    device = distributed.init(opts['device'])
    if not report.is_adm(metrics):
        reference = inputs.load_checked_reference(ref_path, metrics, opts['pr_features'])
    detectors = _load_detectors(evaluate.detectors_for(metrics, opts['pr_features']), opts, device)
    if report.is_adm(metrics):
        reference = inputs.load_adm_reference(ref_path, metrics, detectors, opts['batch'], device)
    main_net, encoder, guides = guidance_setup.load_networks(setup, device)

    runs, names, records = [], [], []
    with runtime.running(edm2_cli.run_settings(precision, compile_unet)):
        _gen_repeats(main_net, encoder, guides, detectors, reference, metrics, device, opts, seed, num, repeats, sigmas,
                     label_rule, save_npz, (runs, names, records))
    if distributed.is_main():
        summary = report.report(runs, metrics, 'network', names)
        report.write_json(out, report.record(
            'gen', detectors, opts, metrics=metrics, **setup.describe(), steps=steps, labels=label_rule,
            ref=str(ref_path), num=num, repeats=repeats, save_npz=save_npz, precision=precision, runs=records,
            summary=summary))
    distributed.barrier()


def _gen_repeats(main_net, encoder, guides, detectors, reference, metrics, device, opts, seed, num, repeats, sigmas,
                 label_rule, save_npz, results):
    """gen's evaluations of disjoint seed ranges, appended to results = (runs, names, records)."""
    runs, names, records = results
    keep, extra = report.kept_features(metrics, opts['pr_features'])
    for r in range(repeats):
        first, last = seed + r * num, seed + (r + 1) * num - 1
        distributed.print0(f'Generating and evaluating {num} images, seeds {first}-{last}')
        stats, labels = network_features.generated_stats(
            main_net, range(first, last + 1), detectors, device, guidance=guides, sigmas=sigmas, classes=label_rule,
            encoder=encoder, batch_size=opts['batch'], keep=keep, extra=extra,
            npz=network_features.npz_path(save_npz, r, repeats) if save_npz else None)
        if distributed.is_main():
            runs.append(_evaluate(stats, reference, metrics, opts, seed, device))
            names.append(f'seeds {first}-{last}')
            records.append(dict(seeds=[first, last], **runs[-1], labels=labels))


# ----------------------------------------------------------------------------------------------------
# sweep: tune autoguidance (main EMA length x guide EMA length x guidance weight)


def _sweep_source(folder, kimg, stds, file, flag):
    if (folder is None) == (file is None):
        raise click.UsageError(f'give exactly one of {flag}-dir and {flag}')
    ignored = [f for f, value in ((f'{flag}-kimg', kimg), (f'{flag}-std', stds)) if value is not None]
    if file is not None and ignored:  # EMA lengths and training times are axes of a snapshot folder only
        what = 'a perturbation of the main network' if self_guides.is_self_guide(file) else 'a fixed network file'
        raise click.UsageError(f'{" and ".join(ignored)} cannot apply to {flag} {file} ({what}); they select '
                               f'snapshots of {flag}-dir')
    if file is not None and flag == '--gnet' and self_guides.is_self_guide(file):
        return sweep_source.self_source(file, flag)
    if file is not None:
        return sweep_source.file_source(file, flag)
    if stds is None:
        raise click.UsageError(f'{flag}-dir needs {flag}-std (EMA lengths, e.g. 0.050,0.075,...,0.150)')
    values = parse_number_list(stds, f'{flag}-std', lo=SIGMA_REL_MIN, hi=SIGMA_REL_MAX, hi_open=True)
    return sweep_source.snapshot_source(folder, kimg, values, flag)


@cli.command()
@click.option('--net-dir', help='Folder of EMA snapshots of the main network', metavar='DIR', default=None)
@click.option('--net-kimg', help='Training time of the main network  [default: latest]', metavar='KIMG',
              type=click.IntRange(min=0), default=None)
@click.option('--net-std', help='Main network EMA lengths, e.g. 0.040,0.050,...,0.160', metavar='LIST', default=None)
@click.option('--net', help='A fixed main network file instead of --net-dir', metavar='PATH', default=None)
@click.option('--gnet-dir', help='Folder of EMA snapshots of the guide (may equal --net-dir)', metavar='DIR',
              default=None)
@click.option('--gnet-kimg', help='Training time of the guide  [default: latest]', metavar='KIMG',
              type=click.IntRange(min=0), default=None)
@click.option('--gnet-std', help='Guide EMA lengths', metavar='LIST', default=None)
@click.option('--gnet', help='A fixed guide file instead of --gnet-dir (unconditional: a CFG sweep), or a '
              "perturbation of each cell's main network: self:pag, self:pag=BLOCKS, self:skip=BLOCKS",
              metavar='PATH|self:...', default=None)
@click.option('--guidance', help='Guidance weights w, e.g. 1.6,1.8,...,2.8', metavar='LIST', required=True)
@click.option('--guidance-rule', 'rules', help="How main and guide combine: lerp, apg:eta=E,momentum=B,threshold=R, "
              "rescale:phi=P; repeat the flag for a rule axis  [default: lerp]", metavar='SPEC', multiple=True,
              type=guidance_setup.RuleType())
@click.option('--guidance-interval', help='Guide only the steps whose noise level lies in (LO, HI]; repeat the flag '
              '(or mix with --guidance-interval-steps) for an interval axis', metavar='LO,HI',
              type=guidance_setup.IntervalType(), multiple=True)
@click.option('--guidance-interval-steps', help='Guide only steps FIRST..LAST (inclusive, from 0); repeatable',
              metavar='FIRST,LAST', type=guidance_setup.StepsType(), multiple=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.pkl, .npz, or URL)', metavar='PKL|NPZ|URL',
              required=True)
@click.option('--metrics', help=f'Metrics; the first one steers --search=descent (comma-separated: '
              f'{", ".join(evaluate.METRICS)})', metavar='LIST', default=DEFAULT_METRICS, show_default=True)
# --num-images: under torchrun 2.13+ a bare --num is refused as an ambiguous prefix of --numa-binding.
@click.option('--num', '--num-images', 'num', help='Number of images per cell', metavar='INT',
              type=_count(2, _image_bytes), default=50000, show_default=True)
@click.option('--seed', help='First seed; every cell uses seeds seed ... seed + num - 1', metavar='INT',
              type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--steps', help='Sampling steps', metavar='INT', type=_count(1, 16, 'step', hi=100000), default=32,
              show_default=True)
@click.option('--search', help='Evaluate every cell, or a coordinate search on the first metric',
              type=click.Choice(['grid', 'descent']), default='grid', show_default=True)
@click.option('--phema-batch', help='Main networks reconstructed per pass over the snapshots (and held)',
              metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--gnet-batch', help='Guides held at once  [default: all]', metavar='INT', type=click.IntRange(min=1),
              default=None)
@edm2_cli.vae_option
@click.option('--outdir', help='Output folder (cells.jsonl, sweep.json, figures); rerun to resume', metavar='DIR',
              required=True)
@click.option('--save-best', help='Write the best main and guide networks and print the commands that use them',
              is_flag=True)
@common_options
@edm2_cli.network_run_options
@one_line_errors
def sweep(net_dir, net_kimg, net_std, net, gnet_dir, gnet_kimg, gnet_std, gnet, guidance, rules, guidance_interval,
          guidance_interval_steps, ref_path, metrics, num, seed, steps, search, phema_batch, gnet_batch, outdir,
          save_best, precision, compile_unet, **opts):
    """Tune autoguidance: metrics over main EMA length x guide EMA length x guidance weight (x guidance rule
    x guidance interval, when those flags are repeated).

    Networks are reconstructed in memory from the snapshots (post-hoc EMA), a batch at a time; every
    cell samples the same seeds. Cost: cells x num images x (steps x 2 - 1) x 2 network evaluations.
    Rerunning with more values of an axis (EMA lengths, w, rules, intervals) computes only the new cells.

    \b
    Examples:
      torchrun --nproc_per_node=8 calculate_metrics.py sweep \\
          --net-dir=runs/img512-s --net-std=0.040,0.050,...,0.160 \\
          --gnet-dir=runs/img512-xs --gnet-kimg=134217 --gnet-std=0.080,0.100,...,0.200 \\
          --guidance=1.6,1.8,...,2.8 --ref=refs/img512.pkl --num-images=10000 --outdir=sweeps/s-autog
      python calculate_metrics.py sweep --net-dir=runs/tiny --net-std=0.05,0.1 --gnet-dir=runs/tiny \\
          --gnet-kimg=1000 --gnet-std=0.05,0.1 --guidance=1.5,2 --ref=refs/tiny.pkl --search=descent --outdir=sw
      python calculate_metrics.py sweep --net-dir=runs/img64-s --net-std=0.05,0.1 --gnet=self:pag \
          --guidance=1.5,2,2.5 --guidance-rule=lerp --guidance-rule=apg:eta=0 \
          --guidance-interval=0.28,2.9 --guidance-interval=0,inf --ref=refs/img64.pkl --outdir=sw-pag
    """
    metrics = _metrics(metrics)
    weights = parse_number_list(guidance, '--guidance')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint="'--outdir'")
    if edm2_cli.path_problem(outdir):
        raise click.BadParameter(edm2_cli.path_problem(outdir), param_hint="'--outdir'")
    net_source = _sweep_source(net_dir, net_kimg, net_std, net, '--net')
    gnet_source = _sweep_source(gnet_dir, gnet_kimg, gnet_std, gnet, '--gnet')
    _check_batch(opts, num)
    device = distributed.init(opts['device'])
    edm2_cli.hold_for_command(outdir)  # one sweep per folder, until the command ends
    reference = inputs.load_checked_reference(ref_path, metrics, opts['pr_features'])
    detectors = _load_detectors(evaluate.detectors_for(metrics, opts['pr_features']), opts, device)
    config = sweep_lib.SweepConfig(
        net_source, gnet_source, weights, metrics, num, seed=seed, steps=steps,
        guidance_interval=list(guidance_interval) or None, guidance_interval_steps=list(guidance_interval_steps) or None,
        rules=rules or ('lerp',), batch=opts['batch'], phema_batch=phema_batch,
        guide_batch=gnet_batch, search=search, pr_features=opts['pr_features'], ref_name=str(ref_path),
        extra_fixed={'--inception-weights/--dinov2-weights': report.detector_info(detectors),
                     '--dinov2-resize': opts['dinov2_resize'], '--pr-features': opts['pr_features'],
                     **({'--precision': precision} if precision else {})})
    sweep_lib.check_resume(outdir, config)
    sweep_lib.preflight(config, device)
    distributed.print0('\n'.join(sweep_report.plan_lines(config)))
    with runtime.running(edm2_cli.run_settings(precision, compile_unet)):
        result = sweep_lib.run_sweep(config, outdir, detectors=detectors, reference=reference, device=device)
    sweep_report.finish(config, outdir, result, device, save_best=save_best)
    distributed.barrier()


def main():
    try:
        cli()
    finally:
        distributed.shutdown()  # a rank leaving with a live gloo group can abort at exit


if __name__ == '__main__':
    main()
