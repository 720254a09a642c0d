"""Train EDM2 diffusion models (SPEC sections 3 and 4).

Runs on CPU, one GPU, or several processes under torchrun (nccl on GPU, gloo on CPU). The run
directory --outdir receives log.txt, stats.jsonl, training_options.json, EMA snapshots
network-snapshot-{kimg:07d}-{std:.3f}.safetensors and checkpoints training-state-{kimg:07d}.pt;
running the same command again resumes from the newest checkpoint.
"""

import click

from edm2 import distributed as dist
from edm2 import presets


def _parse_nimg(ctx, param, value):
    from training.loop import parse_nimg
    if value is None:
        return None
    try:
        return parse_nimg(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _list_of(kind, what):
    """click callback parsing a comma-separated list of `kind` (None stays None, "" is the empty list)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return [kind(v) for v in value.split(',') if v.strip()]
        except ValueError:
            raise click.BadParameter(f'expected a comma-separated list of {what}, got {value!r}') from None
    return parse


EPILOG = """\b
Examples:
  # ImageNet-512, EDM2-S, 8 GPUs (published recipe):
  torchrun --standalone --nproc_per_node=8 train_edm2.py \\
      --outdir=training-runs/00000-edm2-img512-s --data=datasets/img512-sd.zip \\
      --preset=edm2-img512-s --batch-gpu=32
  # Tiny CPU run on a small dataset; run the same command again to resume:
  python train_edm2.py --outdir=runs/tiny --data=datasets/shapes16.zip --cond=1 \\
      --duration=256Ki --batch=64 --channels=32 --channel-mult=1,2 --lr=0.01 --rampup=0 \\
      --status=16Ki --snapshot=64Ki --checkpoint=64Ki --device=cpu
  # Two CPU processes (gloo):
  torchrun --standalone --nproc_per_node=2 train_edm2.py --outdir=runs/tiny2 ...
"""


@click.command(epilog=EPILOG)
# Main options (published).
@click.option('--outdir', help='Run directory (created; an existing run is resumed)', metavar='DIR', required=True)
@click.option('--data', help='Dataset: folder or ZIP of PNGs or VAE latents (.npy)', metavar='PATH', required=True)
@click.option('--cond', help='Train a class-conditional model', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--preset', help='Configuration preset (configs/train.toml)', metavar='STR')
# Hyper-parameters (published; default: the preset's value).
@click.option('--duration', help='Training duration in images, e.g. 2048Mi', metavar='NIMG', callback=_parse_nimg)
@click.option('--batch', help='Total batch size', metavar='NIMG', callback=_parse_nimg)
@click.option('--channels', help='Channel multiplier (model_channels)', metavar='INT', type=click.IntRange(min=1))
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True))
@click.option('--P_mean', 'P_mean', help='Noise level mean (of ln sigma)', metavar='FLOAT', type=float)
@click.option('--P_std', 'P_std', help='Noise level standard deviation', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--lr', help='Reference learning rate alpha_ref', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--decay', help='Learning rate decay t_ref, in batches (0 = none)', metavar='BATCHES', type=click.FloatRange(min=0))
# Performance-related (published).
@click.option('--batch-gpu', help='Maximum batch per process (gradient accumulation beyond)', metavar='NIMG', callback=_parse_nimg)
@click.option('--fp16', help='Mixed precision on CUDA (= --precision fp16 / fp32)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
# I/O-related (published).
@click.option('--status', help='Interval of status prints', metavar='NIMG', callback=_parse_nimg, default='128Ki', show_default=True)
@click.option('--snapshot', help='Interval of network snapshots (0 = end only)', metavar='NIMG', callback=_parse_nimg, default='8Mi', show_default=True)
@click.option('--checkpoint', help='Interval of training-state checkpoints (0 = end only)', metavar='NIMG', callback=_parse_nimg, default='128Mi', show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('-n', '--dry-run', help='Print the training options and exit', is_flag=True)
# Extensions.
@click.option('--precision', help='U-Net precision on CUDA (overrides --fp16); CPU always runs fp32',
              type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--device', help='Device, e.g. cpu, cuda (default: cuda when available)', metavar='STR')
@click.option('--ema-stds', help='Power-function EMA lengths sigma_rel', metavar='LIST', callback=_list_of(float, 'numbers'),
              default='0.050,0.100', show_default=True)
@click.option('--rampup', help='Learning-rate ramp-up in images', metavar='NIMG', callback=_parse_nimg, default='10M', show_default=True)
@click.option('--workers', help='DataLoader worker processes per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--snapshot-dtype', help='Storage dtype of EMA parameters in snapshots', type=click.Choice(['fp16', 'fp32']),
              default='fp16', show_default=True)
@click.option('--channel-mult', help='U-Net channel multipliers per level (default 1,2,3,4)', metavar='LIST', callback=_list_of(int, 'integers'))
@click.option('--num-blocks', help='U-Net blocks per level (default 3)', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn-res', help='Resolutions with self-attention (default 16,8; "" = none)', metavar='LIST', callback=_list_of(int, 'integers'))
def main(outdir, data, cond, preset, duration, batch, channels, dropout, P_mean, P_std, lr, decay, batch_gpu,
         fp16, ls, bench, status, snapshot, checkpoint, seed, dry_run, precision, device, ema_stds, rampup,
         workers, snapshot_dtype, channel_mult, num_blocks, attn_res):
    """Train an EDM2 model (power-function EMA snapshots, resumable checkpoints).

    Without --preset, --duration is required and the other hyper-parameters default to the
    edm2-img512-s values (batch 2048, channels 192, lr 0.0100, decay 70000, dropout 0, P_mean -0.4,
    P_std 1.0). Options given explicitly override the preset.
    """
    from training.loop import TrainingError, training_loop

    opts = dict(batch=2048, channels=192, lr=0.0100, decay=70000, dropout=0.0, P_mean=-0.4, P_std=1.0)
    if preset is not None:
        try:
            row = presets.get('train', preset)
        except presets.PresetError as e:
            raise click.BadParameter(str(e), param_hint='--preset') from None
        opts.update(row)
    explicit = dict(duration=duration, batch=batch, channels=channels, dropout=dropout, P_mean=P_mean, P_std=P_std,
                    lr=lr, decay=decay)
    opts.update({k: v for k, v in explicit.items() if v is not None})
    if opts.get('duration') is None:
        raise click.UsageError('--duration is required without --preset')
    if isinstance(opts['decay'], float) and opts['decay'].is_integer():
        opts['decay'] = int(opts['decay'])
    network = {}
    if channel_mult is not None:
        if not channel_mult:
            raise click.BadParameter('needs at least one level', param_hint='--channel-mult')
        network['channel_mult'] = channel_mult
    if num_blocks is not None:
        network['num_blocks'] = num_blocks
    if attn_res is not None:
        network['attn_resolutions'] = attn_res
    opts.update(outdir=outdir, data=data, cond=cond, batch_gpu=batch_gpu, ls=ls, bench=bench, status=status,
                snapshot=snapshot, checkpoint=checkpoint, seed=seed, device=device, ema_stds=ema_stds,
                rampup=rampup, workers=workers, snapshot_dtype=snapshot_dtype, network=network,
                precision=precision or ('fp16' if fp16 else 'fp32'))
    try:
        training_loop(opts, dry_run=dry_run)
    except TrainingError as e:
        if dist.is_main():
            raise click.ClickException(str(e)) from None
        raise SystemExit(1) from None
    finally:
        dist.shutdown()


if __name__ == '__main__':
    main()
