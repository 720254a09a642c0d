"""Compute FID, FD_DINOv2, precision and recall: reference statistics (`ref`), a folder of images
(`calc`) or a network sampled on the fly (`gen`). See `python calculate_metrics.py COMMAND --help`.
`--protocol adm` computes the ADM evaluator's FID, sFID, Inception Score, precision and recall instead
(against ADM reference batches such as VIRTUAL_imagenet512.npz), and `ref --protocol adm` writes one.

Runs on CPU, one GPU, or `torchrun --nproc_per_node=N` (the images are split over the ranks and the
statistics summed). Detector weights: see `--inception-weights` / `--dinov2-weights`.
"""

import json
import os
import time

import click
import numpy as np
import torch

from edm2 import cli as edm2_cli
from edm2 import distributed, generation, guidance_setup, sampling
from edm2.metrics import detectors as det_lib
from edm2.metrics import adm, evaluate
from edm2.metrics.adm_npz import AdmBatch, AdmFileError, NpzImageWriter, SampleBatchSink
from edm2.metrics.frechet import FrechetError
from edm2.fileio import atomic_write
from edm2.metrics.reference import ReferenceFileError, load_reference, save_reference

DEFAULT_METRICS = 'fid,fd_dinov2'
PROTOCOLS = ('edm2', 'adm')

# ----------------------------------------------------------------------------------------------------
# Helpers


def _one_line(e):
    s = str(e).strip()
    return s.splitlines()[-1] if s else type(e).__name__


def _fail(msg):
    raise click.ClickException(_one_line(msg))


def _atomic_write_text(path, text):
    with atomic_write(path, 'w') as f:
        f.write(text)


def _parse_metrics(text, protocol='edm2'):
    """--metrics (None: the protocol's default) -> list; ADM metrics only with --protocol adm and vice versa."""
    if text is None:
        return list(adm.METRICS) if protocol == 'adm' else evaluate.parse_metrics(DEFAULT_METRICS)
    try:
        metrics = evaluate.parse_metrics(text)
    except evaluate.MetricError as e:
        raise click.BadParameter(str(e), param_hint="'--metrics'") from None
    is_adm = [m in adm.METRICS for m in metrics]
    if any(is_adm) and not all(is_adm):
        raise click.BadParameter(f'ADM metrics ({", ".join(adm.METRICS)}) and EDM2 metrics need different '
                                 f'references; compute them in separate runs', param_hint="'--metrics'")
    if protocol == 'adm' and not all(is_adm):
        raise click.BadParameter(f'--protocol adm computes {", ".join(adm.METRICS)}', param_hint="'--metrics'")
    return metrics


def _is_adm(metrics):
    return any(m in adm.METRICS for m in metrics)


def _rank0_first(fn, *args):
    """Run fn on rank 0 before the other ranks, so that a download happens once and is then reused."""
    if not distributed.is_main():
        distributed.barrier()
    try:
        return fn(*args)
    finally:
        if distributed.is_main():
            distributed.barrier()


def _load_detectors(names, opts, device):
    weights = {'inception': opts['inception_weights'], 'dinov2': opts['dinov2_weights']}

    def load():
        out = {}
        for name in names:
            try:
                out[name] = det_lib.load_detector(name, weights=weights[name], device=device,
                                                  resize_mode=opts['dinov2_resize'])
            except det_lib.DetectorError as e:
                _fail(e)
        return out
    return _rank0_first(load)


def _detector_info(detectors):
    return {name: {'weights': str(d.weights_path), 'sha256': d.weights_sha256} for name, d in detectors.items()}


def _load_ref(path):
    def load():
        try:
            return load_reference(path)
        except ReferenceFileError as e:
            _fail(e)
    return _rank0_first(load)


def _load_adm_ref(path, metrics, detectors, opts, device):
    """ADM reference dict for `metrics` from batch file `path` (statistics from the file; precision/recall
    features, and statistics the file lacks, computed from its arr_0 images on every rank)."""
    dims = detectors['inception'].output_dims
    try:
        batch = _rank0_first(AdmBatch, path)
        ref, from_images = adm.read_reference(batch, metrics, {s: dims[o] for s, o in adm.STREAMS.items()})
    except AdmFileError as e:
        _fail(e)
    need_pr = any(m in adm.PR_METRICS for m in metrics)
    if not from_images and not need_pr:
        return ref
    n = batch.num_images()
    distributed.print0(f'Computing features of the {n} reference images in {path}...')
    batches = adm.image_batches(batch, opts['batch'], device)
    try:  # (a truncated arr_0 is found while reading it)
        stats = evaluate.accumulate(batches, {'inception': detectors['inception']}, n, device=device,
                                    keep={adm.POOL} if need_pr else set(),
                                    extra=[s for s in from_images if s != adm.POOL])
        return adm.complete_reference(ref, stats, metrics)
    except ValueError as e:  # AdmFileError, or too few images for statistics
        _fail(e if isinstance(e, AdmFileError) else f'{path}: {e}')


def _check_ref(ref, metrics, pr_features, path):
    try:
        evaluate.check_reference(ref, metrics, pr_features, ref_name=f'reference {path}')
    except evaluate.MetricError as e:
        _fail(e)


def _open_dataset(path, what):
    from edm2.data import DatasetError, ImageFolderDataset
    try:
        ds = ImageFolderDataset(path)
    except DatasetError as e:
        _fail(e)
    if getattr(ds, 'is_latent', False):
        _fail(f'{what} {path} holds latents (.npy); metrics need images (PNG)')
    if ds.num_channels not in (1, 3):
        _fail(f'{what} {path} has {ds.num_channels}-channel images; expected 1 or 3')
    return ds


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
            return _one_line(e)
        return image, pos


def _collate(items):
    for item in items:
        if isinstance(item, str):
            return item
    return torch.from_numpy(np.stack([im for im, _ in items])), torch.tensor([p for _, p in items])


def _dataset_batches(dataset, indices, batch, workers, desc, errors):
    """This rank's batches (uint8 images, positions into `indices`), with a progress bar on rank 0.

    A file that cannot be read ends this rank's stream and its message goes to `errors`; the caller
    still takes part in the collective reduction, so that no rank waits forever (`_check_errors`).
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = np.arange(len(indices))[rank::world]
    items = _Items(dataset, indices)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, mine.tolist()), batch_size=batch, shuffle=False, num_workers=workers,
        collate_fn=_collate, prefetch_factor=2 if workers > 0 else None)
    bar = None
    if distributed.is_main():
        import tqdm
        bar = tqdm.tqdm(total=len(mine), unit='img', desc=desc, leave=False)
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


def _accumulate_dataset(dataset, positions, detectors, opts, device, desc, **kwargs):
    errors = []
    batches = _dataset_batches(dataset, positions, opts['batch'], opts['workers'], desc, errors)
    stats = evaluate.accumulate(batches, detectors, len(positions), device=device, **kwargs)
    failed = distributed.all_reduce_sum(torch.tensor([float(bool(errors))], device=device))
    if errors:
        _fail(errors[0])
    if failed.item() > 0:
        _fail('another rank could not read its images (see its message)')
    return stats


def _print_table(rows, metrics, label):
    """rows: list of (name, {metric: value}); printed on rank 0."""
    fmt = {'fid': '{:.4f}', 'fd_dinov2': '{:.4f}', 'precision': '{:.4f}', 'recall': '{:.4f}', 'adm_fid': '{:.4f}',
           'sfid': '{:.4f}', 'is': '{:.3f}', 'adm_precision': '{:.4f}', 'adm_recall': '{:.4f}'}
    head = f'{label:<24}' + ''.join(f'{m:>12}' for m in metrics)
    distributed.print0(head)
    distributed.print0('-' * len(head))
    for name, values in rows:
        distributed.print0(f'{name:<24}' + ''.join(f'{fmt[m].format(values[m]):>12}' for m in metrics))


def _summarise(runs, metrics):
    if len(runs) < 2:
        return None
    return {m: {'min': float(min(r[m] for r in runs)), 'mean': float(np.mean([r[m] for r in runs]))}
            for m in metrics}


def _report(runs, metrics, label, names):
    rows = [(n, r) for n, r in zip(names, runs)]
    summary = _summarise(runs, metrics)
    if summary:
        rows += [('min', {m: summary[m]['min'] for m in metrics}), ('mean', {m: summary[m]['mean'] for m in metrics})]
    _print_table(rows, metrics, label)
    return summary


def _evaluate(stats, ref, metrics, opts, seed, device):
    try:
        return evaluate.compute_metrics(stats, ref, metrics, pr_detector=opts['pr_features'], seed=seed,
                                        device=device, pr_mode=opts['adm_distances'])
    except (evaluate.MetricError, FrechetError) as e:
        _fail(e)


def _write_json(path, obj):
    if path and distributed.is_main():
        try:
            _atomic_write_text(path, json.dumps(obj, indent=2) + '\n')
        except OSError as e:
            _fail(f'cannot write {path}: {e.strerror or e}')
        distributed.print0(f'Results written to {path}')


# ----------------------------------------------------------------------------------------------------
# Command line


def common_options(fn):
    opts = [
        click.option('--batch', help='Batch size per process', metavar='INT', type=click.IntRange(min=1),
                     default=64, show_default=True),
        click.option('--workers', help='Data loader worker processes', metavar='INT', type=click.IntRange(min=0),
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


@click.group()
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
              type=click.IntRange(min=1), default=50000, show_default=True)
@click.option('--seed', help='Seed of the stored feature subset (and of the ADM reference images)', metavar='INT',
              type=int, default=0, show_default=True)
@click.option('--ref-images', help='--protocol adm: images stored as arr_0 (seeded random subset)', metavar='INT',
              type=click.IntRange(min=4), default=10000, show_default=True)
@common_options
def ref(data, dest, metrics, keep_features, keep_num, seed, ref_images, **opts):
    """Compute reference statistics of a dataset.

    \b
    Examples:
      python calculate_metrics.py ref --data=datasets/img512.zip --dest=refs/img512.pkl
      python calculate_metrics.py ref --data=datasets/img64.zip --dest=refs/img64-pr.pkl \\
          --metrics=fid,fd_dinov2,precision,recall --keep-features
      python calculate_metrics.py ref --protocol=adm --data=datasets/img512.zip --dest=refs/img512-adm.npz
    """
    if opts['protocol'] == 'adm':
        return _adm_ref(data, dest, seed, ref_images, opts)
    metrics = _parse_metrics(metrics)
    device = distributed.init(opts['device'])
    dataset = _open_dataset(data, 'dataset')
    names = evaluate.detectors_for(metrics, opts['pr_features'])
    keep = set(names) if keep_features else set()
    if any(m in evaluate.PR_METRICS for m in metrics):
        keep.add(opts['pr_features'])
    detectors = _load_detectors(names, opts, device)

    n = len(dataset)
    keep_slots = None
    if keep and n > keep_num:  # store a seeded random subset of the features
        chosen = np.sort(np.random.RandomState(seed % (1 << 31)).permutation(n)[:keep_num])
        keep_slots = np.full(n, -1, dtype=np.int64)
        keep_slots[chosen] = np.arange(keep_num)
    distributed.print0(f'Computing reference statistics of {n} images in {data} ({", ".join(names)})...')
    stats = _accumulate_dataset(dataset, np.arange(n), detectors, opts, device, 'Reference', keep=keep,
                                keep_slots=keep_slots)
    if distributed.is_main():
        try:
            reference = evaluate.reference_from_stats(stats, metrics)
        except ValueError as e:
            _fail(f'{data}: {e}')
        try:
            save_reference(dest, reference)
        except OSError as e:
            _fail(f'cannot write {dest}: {e.strerror or e}')
        distributed.print0(f'Saved statistics of {n} images to {dest}')
    distributed.barrier()


def _adm_ref(data, dest, seed, ref_images, opts):
    """`ref --protocol adm`: an ADM reference batch (.npz) of a dataset: `ref_images` images drawn with
    `seed` as arr_0, and mu, sigma, mu_s, sigma_s of the whole dataset."""
    device = distributed.init(opts['device'])
    dataset = _open_dataset(data, 'dataset')
    detectors = _load_detectors(['inception'], opts, device)
    n = len(dataset)
    distributed.print0(f'Computing ADM reference statistics of {n} images in {data}...')
    stats = _accumulate_dataset(dataset, np.arange(n), detectors, opts, device, 'Reference', extra=[adm.SPATIAL])
    if distributed.is_main():
        chosen = adm.reference_subset(n, ref_images, seed)
        try:
            (mu, sigma), (mu_s, sigma_s) = stats[adm.POOL].mu_sigma(), stats[adm.SPATIAL].mu_sigma()
            shape = (dataset.resolution, dataset.resolution, dataset.num_channels)
            with NpzImageWriter(dest, len(chosen), shape) as writer:
                for start in range(0, len(chosen), 256):
                    writer.append(np.stack([dataset[int(i)][0].transpose(1, 2, 0) for i in chosen[start:start + 256]]))
                writer.extra.update(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
        except OSError as e:
            _fail(f'cannot write {dest}: {e.strerror or e}')
        except ValueError as e:
            _fail(f'{data}: {e}')
        distributed.print0(f'Saved an ADM reference batch ({len(chosen)} images, statistics of {n}) to {dest}')
    distributed.barrier()


def _subsets(n_avail, num, repeats, seed, source):
    """Disjoint position lists for the repeats: consecutive blocks in sorted order when the folder holds
    exactly num * repeats images (files named by seed give the papers' seed ranges), otherwise seeded
    random disjoint subsets."""
    need = num * repeats
    if n_avail < need:
        _fail(f'{source} holds {n_avail} images, fewer than --num {num}' +
              (f' x --repeats {repeats} = {need}' if repeats > 1 else ''))
    order = np.arange(n_avail) if n_avail == need else np.random.RandomState(seed % (1 << 31)).permutation(n_avail)
    return [np.sort(order[r * num:(r + 1) * num]) for r in range(repeats)]


def evaluation_options(fn):
    """--ref, --metrics and --num, shared by `calc` and `gen`."""
    for option in reversed([
        click.option('--ref', 'ref_path', help='Reference statistics (.pkl, .npz, or URL)', metavar='PKL|NPZ|URL',
                     required=True),
        click.option('--metrics', help=f'Metrics (comma-separated: {", ".join(evaluate.METRICS)})  [default: '
                     f'{DEFAULT_METRICS}; with --protocol adm: {",".join(adm.METRICS)}]', metavar='LIST', default=None),
        click.option('--num', help='Number of images per evaluation', metavar='INT', type=click.IntRange(min=2),
                     default=50000, show_default=True),
    ]):
        fn = option(fn)
    return fn


@cli.command()
@click.option('--images', help='Folder or ZIP of images to evaluate', metavar='PATH', required=True)
@evaluation_options
@click.option('--seed', help='Seed of the random subset when the folder holds more images', metavar='INT',
              type=int, default=0, show_default=True)
@click.option('--repeats', help='Evaluate this many disjoint subsets; report each, min and mean', metavar='INT',
              type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--out', help='Write results and settings as JSON', metavar='JSON', default=None)
@common_options
def calc(images, ref_path, metrics, num, seed, repeats, out, **opts):
    """Calculate metrics of a folder of images.

    \b
    Examples:
      python calculate_metrics.py calc --images=out --ref=refs/img512.pkl --num=50000
      python calculate_metrics.py calc --images=out --ref=refs/img64-pr.pkl \\
          --metrics=fid,precision,recall --num=50000 --repeats=3 --out=metrics.json
    """
    metrics = _parse_metrics(metrics, opts['protocol'])
    device = distributed.init(opts['device'])
    if not _is_adm(metrics):
        reference = _load_ref(ref_path)
        _check_ref(reference, metrics, opts['pr_features'], ref_path)
    dataset = _open_dataset(images, 'image folder')
    subsets = _subsets(len(dataset), num, repeats, seed, images)
    names = evaluate.detectors_for(metrics, opts['pr_features'])
    detectors = _load_detectors(names, opts, device)
    keep, extra = _kept(metrics, opts)
    if _is_adm(metrics):
        reference = _load_adm_ref(ref_path, metrics, detectors, opts, device)

    runs, labels = [], []
    for r, positions in enumerate(subsets):
        distributed.print0(f'Evaluating {num} images of {images}' + (f' (subset {r + 1}/{repeats})' if repeats > 1 else ''))
        stats = _accumulate_dataset(dataset, positions, detectors, opts, device, 'Features', keep=keep, extra=extra)
        if distributed.is_main():
            runs.append(_evaluate(stats, reference, metrics, opts, seed, device))
            labels.append(f'subset {r}' if repeats > 1 else os.path.basename(os.path.normpath(images)))
    if distributed.is_main():
        summary = _report(runs, metrics, 'images', labels)
        _write_json(out, dict(
            command='calc', metrics=metrics, images=os.path.abspath(images), ref=str(ref_path), num=num, seed=seed,
            repeats=repeats, runs=[dict(subset=r, **v) for r, v in enumerate(runs)], summary=summary,
            detectors=_detector_info(detectors), dinov2_resize=opts['dinov2_resize'], pr_features=opts['pr_features'],
            protocol=opts['protocol'], adm_distances=opts['adm_distances'],
            world_size=distributed.get_world_size(), time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())))
    distributed.barrier()


def _kept(metrics, opts):
    """(feature sets whose rows are stored, extra Inception outputs) that `metrics` need."""
    if _is_adm(metrics):
        return adm.kept_streams(metrics), adm.extra_streams(metrics)
    return ({opts['pr_features']} if any(m in evaluate.PR_METRICS for m in metrics) else set()), []


def _npz_path(path, r, repeats):
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


def _finish_npz(sink):
    try:
        sink.finish()
    except (OSError, ValueError) as e:
        _fail(f'cannot write {sink.path}: {getattr(e, "strerror", None) or e}')
    distributed.print0(f'Saved the images as an ADM sample batch: {sink.path}')


@cli.command()
@guidance_setup.guidance_options
@evaluation_options
@click.option('--seed', help='First seed; evaluation r uses seeds seed + r*num ... seed + (r+1)*num - 1',
              metavar='INT', type=edm2_cli.Int(0), default=0, show_default=True)
@click.option('--repeats', help='Evaluate this many disjoint seed ranges; report each, min and mean', metavar='INT',
              type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--steps', help='Heun steps of the sampler', metavar='INT', type=edm2_cli.Int(1, 100000), default=32,
              show_default=True)
@click.option('--labels', 'label_rule', type=click.Choice(generation.CLASS_RULES), default='random', show_default=True,
              help="Classes of a conditional net: 'random' (each drawn from its seed's stream, the published "
                   "rule) or 'balanced' (every class equally often within one, by the seed's position in the range)")
@click.option('--out', help='Write results and settings (with the class of every image) as JSON', metavar='JSON',
              default=None)
@click.option('--save-npz', help='Also write the images as an ADM sample batch (arr_0 NHWC uint8, arr_1 labels); '
              'with --repeats, FILE-0.npz, FILE-1.npz, ...', metavar='FILE', default=None)
@common_options
def gen(preset, net, gnet, guidance, guide_weights, guidance_interval, guidance_interval_steps, ref_path, metrics,
        num, seed, repeats, steps, label_rule, out, save_npz, **opts):
    """Calculate metrics of a network, generating images on the fly.

    \b
    Examples:
      python calculate_metrics.py gen --net=snapshot.pkl --ref=refs/img64.pkl --num=50000
      torchrun --nproc_per_node=8 calculate_metrics.py gen --preset=edm2-img512-s-autog-fid \\
          --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl --repeats=3 --out=s-autog.json
      python calculate_metrics.py gen --net=s.pkl --gnet=xs-uncond.pkl --guidance=2.1 \\
          --guidance-interval=0.28,2.9 --labels=balanced --ref=refs/img512.pkl
      python calculate_metrics.py gen --preset=edm2-img512-xxl-guid-interval-fid --ref=refs/img512.pkl
    """
    metrics = _parse_metrics(metrics, opts['protocol'])
    setup = guidance_setup.resolve(preset, net, gnet, guidance, guide_weights, guidance_interval,
                                   guidance_interval_steps)
    sigmas = sampling.edm_schedule(steps)
    guidance_setup.check_schedule(setup, sigmas)
    if out is not None:
        edm2_cli.check_output(out, '--out')
    try:
        device = distributed.init(opts['device'])
    except distributed.DeviceError as e:
        edm2_cli.fail(e)
    if not _is_adm(metrics):
        reference = _load_ref(ref_path)
        _check_ref(reference, metrics, opts['pr_features'], ref_path)
    names = evaluate.detectors_for(metrics, opts['pr_features'])
    detectors = _load_detectors(names, opts, device)
    if _is_adm(metrics):
        reference = _load_adm_ref(ref_path, metrics, detectors, opts, device)
    main_net, encoder, guides = guidance_setup.load_networks(setup, device)
    keep, extra = _kept(metrics, opts)

    runs, names_, seed_ranges, run_labels = [], [], [], []
    for r in range(repeats):
        first = seed + r * num
        distributed.print0(f'Generating and evaluating {num} images, seeds {first}-{first + num - 1}')
        try:
            stream = generation.generate(main_net, range(first, first + num), guidance=guides, sigmas=sigmas,
                                         classes=label_rule, encoder=encoder, batch_size=opts['batch'],
                                         device=device, progress=True)
        except sampling.SamplingError as e:
            _fail(e)
        record = []
        sink = SampleBatchSink(_npz_path(save_npz, r, repeats), range(first, first + num)) if save_npz else None
        try:
            stats = evaluate.accumulate(_labelled(sink.tee(stream) if sink else stream, record), detectors, num,
                                        keep=keep, device=device, extra=extra)
        except sampling.SamplingError as e:
            _fail(e)
        if sink is not None:
            _finish_npz(sink)
        labels = _gather_labels(record)
        if distributed.is_main():
            runs.append(_evaluate(stats, reference, metrics, opts, seed, device))
            names_.append(f'seeds {first}-{first + num - 1}')
            seed_ranges.append([first, first + num - 1])
            run_labels.append(labels)
    if distributed.is_main():
        summary = _report(runs, metrics, 'network', names_)
        _write_json(out, dict(
            command='gen', metrics=metrics, **setup.describe(), steps=steps, labels=label_rule,
            ref=str(ref_path), num=num, repeats=repeats, save_npz=save_npz,
            runs=[dict(seeds=sr, **v, labels=lab) for sr, v, lab in zip(seed_ranges, runs, run_labels)],
            summary=summary, detectors=_detector_info(detectors), dinov2_resize=opts['dinov2_resize'],
            pr_features=opts['pr_features'], protocol=opts['protocol'],
            adm_distances=opts['adm_distances'], world_size=distributed.get_world_size(),
            time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())))
    distributed.barrier()



# ----------------------------------------------------------------------------------------------------
# sweep: tune autoguidance (main EMA length x guide EMA length x guidance weight)


def _sweep_source(folder, kimg, stds, file, flag):
    from edm2.cli import parse_number_list
    from edm2.metrics import sweep_source
    from edm2.phema import SIGMA_REL_MAX
    if (folder is None) == (file is None):
        raise click.UsageError(f'give exactly one of {flag}-dir and {flag}')
    if file is not None:
        return sweep_source.file_source(file, flag)
    if stds is None:
        raise click.UsageError(f'{flag}-dir needs {flag}-std (EMA lengths, e.g. 0.050,0.075,...,0.150)')
    values = parse_number_list(stds, f'{flag}-std', lo=0, hi=SIGMA_REL_MAX, lo_open=True, hi_open=True)
    try:
        return sweep_source.snapshot_source(folder, kimg, values, flag)
    except sweep_source.SweepError as e:
        _fail(e)


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
@click.option('--gnet', help='A fixed guide file instead of --gnet-dir (unconditional: a CFG sweep)', metavar='PATH',
              default=None)
@click.option('--guidance', help='Guidance weights w, e.g. 1.6,1.8,...,2.8', metavar='LIST', required=True)
@click.option('--guidance-interval', help='Guide only the steps whose noise level lies in (LO, HI]', metavar='LO,HI',
              type=guidance_setup.IntervalType(), default=None)
@click.option('--guidance-interval-steps', help='Guide only steps FIRST..LAST (inclusive, from 0)',
              metavar='FIRST,LAST', type=guidance_setup.StepsType(), default=None)
@click.option('--ref', 'ref_path', help='Reference statistics (.pkl, .npz, or URL)', metavar='PKL|NPZ|URL',
              required=True)
@click.option('--metrics', help=f'Metrics; the first one steers --search=descent (comma-separated: '
              f'{", ".join(evaluate.METRICS)})', metavar='LIST', default=DEFAULT_METRICS, show_default=True)
# --num-images: under torchrun 2.13+ a bare --num is refused as an ambiguous prefix of --numa-binding.
@click.option('--num', '--num-images', 'num', help='Number of images per cell', metavar='INT',
              type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='First seed; every cell uses seeds seed ... seed + num - 1', metavar='INT',
              type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--steps', help='Sampling steps', metavar='INT', type=click.IntRange(min=1), default=32,
              show_default=True)
@click.option('--search', help='Evaluate every cell, or a coordinate search on the first metric',
              type=click.Choice(['grid', 'descent']), default='grid', show_default=True)
@click.option('--phema-batch', help='Main networks reconstructed per pass over the snapshots (and held)',
              metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--gnet-batch', help='Guides held at once  [default: all]', metavar='INT', type=click.IntRange(min=1),
              default=None)
@click.option('--outdir', help='Output folder (cells.jsonl, sweep.json, figures); rerun to resume', metavar='DIR',
              required=True)
@click.option('--save-best', help='Write the best main and guide networks and print the commands that use them',
              is_flag=True)
@common_options
def sweep(net_dir, net_kimg, net_std, net, gnet_dir, gnet_kimg, gnet_std, gnet, guidance, guidance_interval,
          guidance_interval_steps, ref_path, metrics, num, seed, steps, search, phema_batch, gnet_batch, outdir,
          save_best, **opts):
    """Tune autoguidance: metrics over main EMA length x guide EMA length x guidance weight.

    Networks are reconstructed in memory from the snapshots (post-hoc EMA), a batch at a time; every
    cell samples the same seeds. Cost: cells x num images x (steps x 2 - 1) x 2 network evaluations.

    \b
    Examples:
      torchrun --nproc_per_node=8 calculate_metrics.py sweep \\
          --net-dir=runs/img512-s --net-std=0.040,0.050,...,0.160 \\
          --gnet-dir=runs/img512-xs --gnet-kimg=134217 --gnet-std=0.080,0.100,...,0.200 \\
          --guidance=1.6,1.8,...,2.8 --ref=refs/img512.pkl --num-images=10000 --outdir=sweeps/s-autog
      python calculate_metrics.py sweep --net-dir=runs/tiny --net-std=0.05,0.1 --gnet-dir=runs/tiny \\
          --gnet-kimg=1000 --gnet-std=0.05,0.1 --guidance=1.5,2 --ref=refs/tiny.pkl --search=descent --outdir=sw
    """
    from edm2.cli import parse_number_list
    from edm2.metrics import sweep as sweep_lib
    from edm2.metrics import sweep_report
    metrics = _parse_metrics(metrics)
    weights = parse_number_list(guidance, '--guidance')
    if guidance_interval is not None and guidance_interval_steps is not None:
        raise click.UsageError('give --guidance-interval or --guidance-interval-steps, not both')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint="'--outdir'")
    net_source = _sweep_source(net_dir, net_kimg, net_std, net, '--net')
    gnet_source = _sweep_source(gnet_dir, gnet_kimg, gnet_std, gnet, '--gnet')
    device = distributed.init(opts['device'])
    reference = _load_ref(ref_path)
    _check_ref(reference, metrics, opts['pr_features'], ref_path)
    names = evaluate.detectors_for(metrics, opts['pr_features'])
    detectors = _load_detectors(names, opts, device)
    try:
        config = sweep_lib.SweepConfig(
            net_source, gnet_source, weights, metrics, num, seed=seed, steps=steps, guidance_interval=guidance_interval,
            guidance_interval_steps=guidance_interval_steps, batch=opts['batch'], phema_batch=phema_batch,
            guide_batch=gnet_batch, search=search, pr_features=opts['pr_features'], ref_name=str(ref_path),
            extra_fixed={'--inception-weights/--dinov2-weights': _detector_info(detectors),
                         '--dinov2-resize': opts['dinov2_resize'], '--pr-features': opts['pr_features']})
        sweep_lib.check_resume(outdir, config)
        sweep_lib.preflight(config, device)
    except sweep_lib.SweepError as e:
        _fail(e)
    distributed.print0('\n'.join(sweep_report.plan_lines(config)))
    try:
        result = sweep_lib.run_sweep(config, outdir, detectors=detectors, reference=reference, device=device)
    except (sweep_lib.SweepError, evaluate.MetricError, FrechetError) as e:
        _fail(e)
    sweep_report.finish(config, outdir, result, device, save_best=save_best)
    distributed.barrier()


if __name__ == '__main__':
    try:
        cli()
    finally:
        distributed.shutdown()  # a rank leaving with a live gloo group can abort at exit
