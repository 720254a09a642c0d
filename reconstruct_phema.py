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
them) and native snapshots in --indir, in any mix. Outputs are native files
`{outprefix}-{kimg:07d}-{std:.3f}` plus the native extension, stored in float32 unless --dtype=float16.
Under torchrun the outputs are split between the processes.
"""

import os
import re
import uuid

import click

from edm2 import distributed, phema

STD_RANGE = f'(0, {phema.SIGMA_REL_MAX:.4f})'


def parse_float_list(text, name='--outstd'):
    """'0.05,0.1' -> [0.05, 0.1]; '0.010,0.015,...,0.250' -> the evenly spaced range 0.010, 0.015, ..., 0.250
    (the step is the difference of the two values before '...'; the range must land on the value after)."""
    from decimal import Decimal, InvalidOperation
    items = [s.strip() for s in str(text).split(',') if s.strip()]
    values = []
    i = 0
    try:
        while i < len(items):
            if items[i] in ('...', '…'):
                if len(values) < 2 or i + 1 >= len(items):
                    raise click.BadParameter(f'"..." needs two values before it and one after, e.g. '
                                             f'0.010,0.015,...,0.250; got {text!r}', param_hint=name)
                step, end = values[-1] - values[-2], Decimal(items[i + 1])
                count = (end - values[-1]) / step if step != 0 else Decimal(-1)
                if step <= 0 or count < 1 or count != count.to_integral_value():
                    raise click.BadParameter(f'range {values[-2]},{values[-1]},...,{end} does not step evenly '
                                             f'upwards onto {end}', param_hint=name)
                values += [values[-1] + step * (k + 1) for k in range(int(count))]
                i += 2
            else:
                values.append(Decimal(items[i]))
                i += 1
    except InvalidOperation:
        raise click.BadParameter(f'expected numbers separated by commas, got {text!r}', param_hint=name) from None
    if not values:
        raise click.BadParameter('expected at least one value', param_hint=name)
    return [float(v) for v in values]


def parse_std_list(text, name):
    stds = parse_float_list(text, name)
    for std in stds:
        if not 0 < std < phema.SIGMA_REL_MAX:
            raise click.BadParameter(f'EMA length {std} outside {STD_RANGE}', param_hint=name)
    return stds


def native_suffix():
    from edm2 import checkpoint
    for name in ('NATIVE_SUFFIX', 'NATIVE_EXTENSION', 'SUFFIX', 'EXTENSION'):
        if isinstance(getattr(checkpoint, name, None), str):
            return getattr(checkpoint, name)
    return '.safetensors'


def output_name(outprefix, kimg, std):
    return f'{outprefix}-{kimg:07d}-{std:.3f}{native_suffix()}'


def _save(path, rec, dtype):
    import torch
    from edm2.checkpoint import save_network
    # The first input's metadata (dataset, loss, batch, ...) carries over; time and length are the output's.
    extra = {k: v for k, v in (rec.metadata or {}).items() if k not in ('kimg', 'ema_std', 'nimg', 'format', 'phema')}
    provenance = dict(inputs=[os.path.basename(str(s.source)) for s, _ in rec.coefficients],
                      coefficients=[c for _, c in rec.coefficients])
    save_network(path, rec.net, rec.encoder, dtype=getattr(torch, dtype), kimg=rec.kimg, ema_std=rec.std,
                 nimg=rec.nimg, phema=provenance, **extra)


@click.command(help=__doc__, context_settings=dict(max_content_width=110))
@click.option('--indir', help='Folder of input snapshots', metavar='DIR', type=str, required=True)
@click.option('--inprefix', help='Only inputs whose file name starts with this', metavar='STR', type=str)
@click.option('--instd', help='Only inputs of these EMA lengths', metavar='LIST', type=str)
@click.option('--outdir', help='Where to save the reconstructed networks', metavar='DIR', type=str, required=True)
@click.option('--outprefix', help='Output file name prefix', metavar='STR', type=str, default='phema',
              show_default=True)
@click.option('--outstd', help='EMA lengths to reconstruct, e.g. 0.1,0.2 or 0.010,0.015,...,0.250',
              metavar='LIST', type=str, required=True)
@click.option('--outkimg', help='Training time of the outputs  [default: latest input]', metavar='KIMG',
              type=click.IntRange(min=0))
@click.option('--skip', help='Skip outputs whose file already exists', is_flag=True)
@click.option('--batch', help='Outputs reconstructed per pass over the inputs', metavar='INT',
              type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--dtype', help='Storage precision of the outputs', type=click.Choice(['float32', 'float16']),
              default='float32', show_default=True)
@click.option('--device', help='Device to sum on  [default: cuda if available, else cpu]', metavar='STR',
              type=str)
def main(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch, dtype, device):
    dev = distributed.init(device)
    try:
        run(dev, indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch, dtype)
    finally:
        distributed.shutdown()


def run(dev, indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch, dtype):
    out_stds = parse_std_list(outstd, '--outstd')
    in_stds = parse_std_list(instd, '--instd') if instd is not None else None
    if not re.fullmatch(r'[^/\\]+', outprefix):
        raise click.BadParameter(f'expected a file name prefix without slashes, got {outprefix!r}',
                                 param_hint='--outprefix')
    if not os.path.isdir(indir):
        raise click.BadParameter(f'{indir} is not a folder', param_hint='--indir')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
    snapshots = phema.find_snapshots(indir, inprefix=inprefix, instd=in_stds)
    if not snapshots:
        what = ''.join([f' starting with {inprefix!r}' if inprefix else '',
                        f' with EMA length in {instd}' if instd else ''])
        raise click.ClickException(f'no snapshots named PREFIX-KIMG-STD.pkl or PREFIX-KIMG-STD{native_suffix()}'
                                   f'{what} found in {indir}')
    names = {}
    for std in out_stds:
        name = output_name(outprefix, 0, std)
        if name in names:
            raise click.BadParameter(f'{names[name]} and {std} give the same file name (3 decimals)',
                                     param_hint='--outstd')
        names[name] = std
    try:
        kimg, nimg, inputs, X = phema.plan_reconstruction(snapshots, out_stds, outkimg)
    except phema.PhemaError as e:
        raise click.ClickException(str(e)) from None

    # Plan.
    todo = []
    for std in out_stds:
        path = os.path.join(outdir, output_name(outprefix, kimg, std))
        if not (skip and os.path.exists(path)):
            todo.append((std, path))
    distributed.print0(f'Inputs: {len(inputs)} of {len(snapshots)} snapshots in {indir} (time <= kimg {kimg}):')
    for s in snapshots:
        used = 'used' if s in inputs else 'after the target time, unused'
        distributed.print0(f'  {os.path.basename(str(s.source))}  kimg {s.kimg}  std {s.std:.3f}  {used}')
    distributed.print0(f'Outputs: {len(todo)} networks at kimg {kimg} ({nimg} images) in {outdir}, '
                       f'{dtype}, {batch} per pass over the inputs'
                       + (f'; {len(out_stds) - len(todo)} skipped as existing' if len(todo) < len(out_stds) else ''))
    for j, std in enumerate(out_stds):
        rho = phema.fit_error([s.nimg for s in inputs], [s.std for s in inputs], X[:, j], nimg, std)
        path = os.path.join(outdir, output_name(outprefix, kimg, std))
        state = '' if any(p == path for _, p in todo) else '  (exists, skipped)'
        distributed.print0(f'  {os.path.basename(path)}  std {std:.3f}  profile fit error {rho:.2e}{state}')
    if not todo:
        distributed.print0('Nothing to do.')
        return

    # Reconstruct; each rank takes every world_size-th output. The barrier makes every rank decide --skip
    # before any rank writes.
    distributed.barrier()
    mine = todo[distributed.get_rank()::distributed.get_world_size()]
    if mine:
        from edm2.checkpoint import CheckpointError
        paths = dict((std, path) for std, path in mine)
        try:
            batches = phema.reconstruct_batches(inputs, [std for std, _ in mine], out_kimg=kimg, batch=batch,
                                                device=dev, progress=distributed.is_main())
            for recs in batches:
                write_batch(outdir, [(paths[rec.std], rec) for rec in recs], dtype)
                del recs
        except (phema.PhemaError, CheckpointError) as e:  # one line naming the file
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f'cannot write to {outdir}: {e.strerror or e}') from None
    distributed.barrier()
    distributed.print0(f'Done: {len(todo)} networks in {outdir}')


def write_batch(outdir, items, dtype):
    """Write a batch of outputs all-or-nothing: every file goes to a temporary name first and they are
    renamed only once all of them were written; on any failure the temporaries are removed."""
    os.makedirs(outdir, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    temps = []
    try:
        for path, rec in items:
            tmp = os.path.join(os.path.dirname(path), f'.tmp-{tag}-{os.path.basename(path)}')
            temps.append((tmp, path))
            _save(tmp, rec, dtype)
        for tmp, path in temps:
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


if __name__ == '__main__':
    main()
