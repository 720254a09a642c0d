"""Command line for network files: `info` describes one, `convert` rewrites one in the native format.

    python -m edm2.commands.checkpoint_cli info FILE_OR_URL
    python -m edm2.commands.checkpoint_cli convert SRC DST [--half]

(installed as `edm2-checkpoint`.)
"""

import os

import click
import torch

from edm2.checkpoint import CheckpointError, load_snapshot, save_network
from edm2.commands.cli import Group, fail
from edm2.fileio import NoSpaceError, remove_stale_temporaries
from edm2 import jsontext


@click.group(cls=Group, help='Inspect EDM2 network files (native .safetensors or published .pkl) and convert them '
                  'to the native format.')
def cli():
    pass


@cli.command(help='Show what a network file holds: its kind, constructor arguments, number of parameters, '
                  'training time, EMA length and encoder.\n\n'
                  'Example: python -m edm2.commands.checkpoint_cli info network-snapshot-0002147-0.100.pkl')
@click.argument('file')
def info(file):
    try:
        net, encoder, meta = load_snapshot(file)
    except CheckpointError as e:
        fail(e)
    kimg, std = meta.get('kimg'), meta.get('ema_std')
    kind = 'native (safetensors + JSON)' if meta['format'] == 'native' else 'published pickle (imported safely)'
    click.echo(f'file:        {file}')
    click.echo(f'kind:        {kind}')
    click.echo(f'class:       {type(net).__name__}')
    click.echo(f'config:      {jsontext.dumps(net.init_kwargs)}')
    click.echo(f'parameters:  {sum(p.numel() for p in net.parameters()):,}')
    click.echo(f'training:    {"unknown" if kimg is None else f"{kimg} kimg"}')
    click.echo(f'EMA length:  {"unknown" if std is None else f"sigma_rel = {std:.3f}"}')
    click.echo(f'encoder:     {jsontext.dumps(encoder.spec()) if encoder is not None else "none"}')
    extra = {k: v for k, v in meta.items() if k not in ('kimg', 'ema_std', 'format')}
    if extra:
        click.echo(f'metadata:    {jsontext.dumps(extra)}')


@cli.command(help='Rewrite a published pickle or a native file as a native file; DST appears only once '
                  'it is complete.\n\n'
                  'Example: python -m edm2.commands.checkpoint_cli convert edm2-img512-xs-2147483-0.135.pkl '
                  'edm2-img512-xs-2147483-0.135.safetensors')
@click.argument('src')
@click.argument('dst', type=click.Path(dir_okay=False))
@click.option('--half', is_flag=True,
              help='Keep the weights as float16 (exact for published snapshots, which store float16).')
def convert(src, dst, half):
    try:
        net, encoder, meta = load_snapshot(src)
        meta.pop('format', None)
        remove_stale_temporaries(os.path.dirname(os.path.abspath(dst)))  # of conversions that were killed
        save_network(dst, net, encoder, dtype=torch.float16 if half else None, **meta)
    except (CheckpointError, NoSpaceError) as e:
        fail(e)
    click.echo(f'wrote {dst}')


if __name__ == '__main__':
    cli(prog_name='python -m edm2.commands.checkpoint_cli')
