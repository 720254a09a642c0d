"""Post-hoc EMA reconstruction: networks with any EMA length from the snapshots saved during training.

Examples:

\b
  # One EMA length at the latest training time of a run:
  python reconstruct_phema.py --indir=training-runs/00000-edm2-img512-xs --outdir=out --outstd=0.130
\b
  # A sweep of 49 lengths, 8 at a time, from the published pickles at kimg 2147483:
  python reconstruct_phema.py --indir=snapshots --outdir=out --outstd=0.010,0.015,...,0.250 \\
      --outkimg=2147483 --batch=8
\b
  # Then sample from one of them:
  python generate_images.py --net=out/phema-2147483-0.130.safetensors --outdir=images --seeds=0-63

Inputs are the files `{prefix}-{kimg:07d}-{std:.3f}.pkl` (published pickles, opened without executing
them) and native `.safetensors` snapshots in --indir, in any mix. Outputs are native files
`{outprefix}-{kimg:07d}-{std:.3f}.safetensors`, float32 unless --dtype=float16. Under torchrun the
outputs are split between the processes.

Note: the release's reconstruct_phema.py writes .pkl files; this one writes .safetensors (weights and a JSON
header, no code). Every command here reads them (--net FILE), and so does Python:
edm2.load_network(FILE). Code that unpickles the release's .pkl (its dnnlib/torch_utils classes) cannot
read them; load them with edm2 and copy the state dict, whose keys are the release's (docs/phema.md).
"""

import os
import re

import click
import torch

from edm2 import checkpoint, distributed, fileio, phema, phema_reconstruct, run_lock
from edm2.commands.cli import Command, Int, check_memory, fail, fail_once, parse_number_list, path_problem
from edm2.errors import EDM2Error

STD_BOUNDS = dict(lo=phema.SIGMA_REL_MIN, hi=phema.SIGMA_REL_MAX, hi_open=True)


def output_name(outprefix, kimg, std):
    return checkpoint.snapshot_file_name(outprefix, kimg, std)


def _check_outdir(outdir):
    """--outdir must be a writable folder, or creatable inside one."""
    problem = path_problem(outdir)
    if problem:
        raise click.BadParameter(problem, param_hint='--outdir')
    if os.path.exists(outdir):
        if not os.path.isdir(outdir):
            raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise click.BadParameter(f'{outdir} is not writable', param_hint='--outdir')
        return
    parent = os.path.dirname(os.path.abspath(outdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f'{outdir} cannot be created: {parent} is not a writable folder',
                                 param_hint='--outdir')


def _find_inputs(indir, inprefix, instd):
    if not os.path.isdir(indir):
        raise click.BadParameter(f'{indir} is not a folder', param_hint='--indir')
    snapshots = phema_reconstruct.find_snapshots(indir, inprefix=inprefix, instd=instd)
    if not snapshots:
        what = ''.join([f' starting with {inprefix!r}' if inprefix else '',
                        f' with EMA length in {instd}' if instd else ''])
        raise click.ClickException(f'no snapshots named PREFIX-KIMG-STD.pkl or PREFIX-KIMG-STD'
                                   f'{checkpoint.NATIVE_SUFFIX}{what} found in {indir}')
    return snapshots


def _output_paths(outdir, outprefix, kimg, out_stds, skip):
    """[(std, path)] still to write; refuses σ_rel that share a file name and paths that are not files."""
    names, todo = {}, []
    for std in out_stds:
        name = output_name(outprefix, kimg, std)
        if name in names:
            raise click.BadParameter(f'{names[name]} and {std} give the same file name (3 decimals)',
                                     param_hint='--outstd')
        names[name] = std
        path = os.path.join(outdir, name)
        if os.path.exists(path) and not os.path.isfile(path):
            raise click.BadParameter(f'{path} exists and is not a file', param_hint='--outdir')
        if not (skip and os.path.exists(path)):
            todo.append((std, path))
    return todo


def _print_plan(indir, outdir, outprefix, snapshots, inputs, kimg, nimg, X, out_stds, todo, batch, dtype):
    distributed.print0(f'Inputs: {len(inputs)} of {len(snapshots)} snapshots in {indir} (time <= kimg {kimg}):')
    for s in snapshots:
        used = 'used' if s in inputs else 'after the target time, unused'
        distributed.print0(f'  {os.path.basename(str(s.source))}  kimg {s.kimg}  std {s.std:.3f}  {used}')
    skipped = len(out_stds) - len(todo)
    distributed.print0(f'Outputs: {len(todo)} networks at kimg {kimg} ({nimg} images) in {outdir}, {dtype}, '
                       f'{batch} per pass over the inputs' + (f'; {skipped} skipped as existing' if skipped else ''))
    pending = {std for std, _ in todo}
    for j, std in enumerate(out_stds):
        rho = phema.fit_error([s.nimg for s in inputs], [s.std for s in inputs], X[:, j], nimg, std)
        state = '' if std in pending else '  (exists, skipped)'
        distributed.print0(f'  {output_name(outprefix, kimg, std)}  std {std:.3f}  profile fit error {rho:.2e}{state}')


@click.command(cls=Command, help=__doc__, context_settings=dict(max_content_width=110))
@click.option('--indir', help='Folder holding the snapshots saved during training', metavar='DIR', type=str,
              required=True)
@click.option('--inprefix', help='Use only snapshots whose file name begins with this', metavar='STR', type=str)
@click.option('--instd', help='Use only snapshots with these EMA lengths, e.g. 0.050', metavar='LIST', type=str)
@click.option('--outdir', help='Folder for the reconstructed networks (created if needed)', metavar='DIR',
              type=str, required=True)
@click.option('--outprefix', help='Start of each output file name', metavar='STR', type=str, default='phema',
              show_default=True)
@click.option('--outstd', help='EMA lengths sigma_rel to build: a list (0.1,0.2) or a range (0.010,0.015,...,0.250)',
              metavar='LIST', type=str, required=True)
@click.option('--outkimg', help='Training time of the outputs, in kimg; one of the inputs\' times  '
                                '[default: the latest]', metavar='KIMG', type=Int(lo=0))
@click.option('--skip', help='Leave outputs that already exist untouched', is_flag=True)
@click.option('--batch', help='Outputs summed in one pass over the inputs (memory grows with it)', metavar='INT',
              type=Int(lo=1, hi=4096), default=8, show_default=True)
@click.option('--dtype', help='Precision the outputs are stored in', type=click.Choice(['float32', 'float16']),
              default='float32', show_default=True)
@click.option('--device', help='Where the sums are computed  [default: cuda when present, else cpu]',
              metavar='STR', type=str)
def main(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch, dtype, device):
    out_stds = parse_number_list(outstd, '--outstd', **STD_BOUNDS)
    in_stds = parse_number_list(instd, '--instd', **STD_BOUNDS) if instd is not None else None
    if not re.fullmatch(r'[^/\\]+', outprefix) or outprefix.startswith('.'):
        raise click.BadParameter(f'expected a file name prefix without slashes or a leading dot, got {outprefix!r}',
                                 param_hint='--outprefix')
    _check_outdir(outdir)
    try:
        dev = distributed.init(device)
    except EDM2Error as e:
        fail(e)
    try:
        with run_lock.hold_run_folder(outdir) as removed:
            for path in removed:
                distributed.print0(f'Removed {path.name}, left by an interrupted run')
            run(dev, indir, inprefix, in_stds, outdir, outprefix, out_stds, outkimg, skip, batch, dtype)
    except run_lock.FolderInUseError as e:
        fail_once(e)
    finally:
        distributed.shutdown()


def run(dev, indir, inprefix, in_stds, outdir, outprefix, out_stds, outkimg, skip, batch, dtype):
    try:
        snapshots = _find_inputs(indir, inprefix, in_stds)
        kimg, nimg, inputs, X = phema_reconstruct.plan_reconstruction(snapshots, out_stds, outkimg)
    except phema.PhemaError as e:
        fail(e)
    todo = _output_paths(outdir, outprefix, kimg, out_stds, skip)
    # Each output of a pass is a float32 network held until written: at least the size of an input file.
    check_memory('--batch', min(batch, max(len(todo), 1)), _file_size(inputs[0].source), 'network', dev)
    _print_plan(indir, outdir, outprefix, snapshots, inputs, kimg, nimg, X, out_stds, todo, batch, dtype)
    if not todo:
        distributed.print0('Nothing to do.')
        return
    # Each rank takes every world_size-th output. The barrier makes every rank decide --skip before
    # any rank writes.
    distributed.barrier()
    mine = todo[distributed.get_rank()::distributed.get_world_size()]
    if mine:
        paths = dict(mine)
        try:
            for recs in phema_reconstruct.reconstruct_batches(inputs, [std for std, _ in mine], kimg, batch=batch,
                                                              device=dev, progress=distributed.is_main()):
                write_batch([(paths[rec.std], rec) for rec in recs], getattr(torch, dtype))
                del recs
        except (EDM2Error, OSError) as e:  # one line naming the file
            fail(e)
    distributed.barrier()
    distributed.print0(f'Done: {len(todo)} networks in {outdir}')


def _file_size(source):
    try:
        return os.path.getsize(source)
    except (OSError, TypeError):  # not a local file (a loader's own source)
        return 1


def _save(path, rec, dtype):
    # The first input's metadata (dataset, loss, batch, ...) carries over; time and length are the output's.
    extra = {k: v for k, v in (rec.metadata or {}).items() if k not in ('kimg', 'ema_std', 'nimg', 'format', 'phema')}
    provenance = dict(inputs=[os.path.basename(str(s.source)) for s, _ in rec.coefficients],
                      coefficients=[c for _, c in rec.coefficients])
    checkpoint.save_network(path, rec.net, rec.encoder, dtype=dtype, kimg=rec.kimg, ema_std=rec.std,
                            nimg=rec.nimg, phema=provenance, **extra)


def write_batch(items, dtype):
    """Write a batch of outputs all-or-nothing: every file goes to a temporary name (edm2.fileio's
    recognisable pattern) and they are renamed only once all were written; on failure the temporaries
    are removed, and those of a killed run are removed by the next run."""
    temps = []
    try:
        for path, rec in items:
            temps.append((fileio.temporary_name(path), path))
            try:
                _save(temps[-1][0], rec, dtype)
            except fileio.NoSpaceError:
                raise fileio.NoSpaceError(fileio.no_space_text(path)) from None  # the output, not the temporary
        for tmp, path in temps:
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


if __name__ == '__main__':
    main()
