"""Train EDM2 diffusion models (EDM2 paper, Sec. 2-3): the command line over `training.loop`.

Runs on CPU, one GPU, or several processes under torchrun (nccl on GPU, gloo on CPU). The run
directory --outdir receives log.txt, stats.jsonl, training_options.json, EMA snapshots
network-snapshot-{kimg:07d}-{std:.3f}.safetensors and checkpoints training-state-{kimg:07d}.pt;
running the same command again resumes from the newest checkpoint.
"""

import click

from edm2 import distributed as dist
from edm2 import presets
from edm2.commands.cli import Command, Float, Int, fail, parse_number_list, report_rank_error
from edm2.errors import EDM2Error
from edm2.metrics import evaluate
from edm2.phema import SIGMA_REL_MAX, SIGMA_REL_MIN
from edm2.training.loop import training_loop
from edm2.training.options import (FLOAT_RANGES, INT_RANGES, LOGGERS, MAX_GRID_SEEDS, NIMG_RANGES, TrainingError,
                                  TrainingOptions, parse_nimg)


class ImageCount(click.ParamType):
    """An image count such as 2048Mi, 128Ki, 10M or 8192, within the range of `NIMG_RANGES[name]`."""
    name = 'nimg'

    def __init__(self, field):
        self.lo, self.hi = NIMG_RANGES[field]

    def convert(self, value, param, ctx):
        try:
            n = parse_nimg(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if not self.lo <= n <= self.hi:
            self.fail(f'must lie in [{self.lo}, {self.hi}] images, got {n}', param, ctx)
        return n


def _float(field):
    return Float(*FLOAT_RANGES[field])


def _int(field):
    return Int(*INT_RANGES[field])


def _integer_list(field, allow_empty):
    """click callback: comma-separated integers in the range of INT_RANGES[field] (None stays None)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        if allow_empty and not value.strip():
            return []
        hint = param.opts[0]
        numbers = parse_number_list(value, hint, *INT_RANGES[field])
        if any(v != int(v) for v in numbers):
            raise click.BadParameter(f'expected whole numbers, got {value!r}', param_hint=hint)
        return [int(v) for v in numbers]
    return parse


def _ema_lengths(ctx, param, value):
    if value is None:
        return None
    return parse_number_list(value, param.opts[0], lo=SIGMA_REL_MIN, hi=SIGMA_REL_MAX, hi_open=True)


def _seeds(ctx, param, value):
    """'0-7' or '0,5,9-11' -> a list of seeds (at most MAX_GRID_SEEDS)."""
    from edm2.commands.generate_images import parse_seeds
    try:
        seeds = parse_seeds(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=param.opts[0]) from None
    if len(seeds) > MAX_GRID_SEEDS:
        raise click.BadParameter(f'at most {MAX_GRID_SEEDS} seeds, got {len(seeds)}', param_hint=param.opts[0])
    return list(seeds)


def _metric_names(ctx, param, value):
    names = [s.strip() for s in value.split(',') if s.strip()]
    allowed = (*evaluate.FD_METRICS, *evaluate.PR_METRICS)
    bad = [n for n in names if n not in allowed] or ([] if names else [value])
    if bad:
        raise click.BadParameter(f'unknown metric {bad[0]!r}; choose from {", ".join(allowed)}', param_hint='--eval-metrics')
    return list(dict.fromkeys(names))


EPILOG = """\b
Examples:
  # EDM2-S on ImageNet-512 latents with 8 GPUs; each process handles 32 images per
  # accumulation round:
  torchrun --standalone --nproc_per_node=8 train_edm2.py \\
      --outdir=training-runs/00000-edm2-img512-s --data=datasets/img512-sd.zip \\
      --preset=edm2-img512-s --batch-gpu=32
  # A small model on the CPU; repeating the command continues where it stopped:
  python train_edm2.py --outdir=runs/tiny --data=datasets/shapes16.zip --cond=1 \\
      --duration=256Ki --batch=64 --channels=32 --channel-mult=1,2 --lr=0.01 --rampup=0 \\
      --status=16Ki --snapshot=64Ki --checkpoint=64Ki --device=cpu
  # The same on two CPU processes (gloo backend):
  torchrun --standalone --nproc_per_node=2 train_edm2.py --outdir=runs/tiny2 ...
  # Watching it: a sample grid every 16Ki images, FID of two EMA lengths (0.15 reconstructed
  # post hoc) every 64Ki, TensorBoard event files in the run folder:
  python train_edm2.py --outdir=runs/tiny ... --grid=16Ki --eval=64Ki --eval-ref=refs/shapes16.pkl \
      --eval-num=1000 --eval-stds=0.10,0.15 --logger=tensorboard

\b
Image counts take the suffixes Ki/Mi/Gi (powers of 1024) or k/M/G (powers of 1000).
Every number is checked before anything is written; an error is one line naming the flag.
"""


@click.command(cls=Command, epilog=EPILOG)
# Main options (published names).
@click.option('--outdir', help='Run folder; created if missing, continued if it holds a run', metavar='DIR',
              required=True)
@click.option('--data', help='Training images: a folder or ZIP of PNG files or of VAE latents (.npy)',
              metavar='PATH', required=True)
@click.option('--cond', help='Use the class labels of dataset.json', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--preset', help='Named hyper-parameter set from configs/train.toml (the release\'s default too)',
              metavar='STR', default='edm2-img512-s', show_default=True)
# Hyper-parameters (published names; default: the preset's value).
@click.option('--duration', help='Images to train on in total, e.g. 2048Mi', metavar='NIMG',
              type=ImageCount('duration'))
@click.option('--batch', help='Images per optimiser step, over all processes', metavar='NIMG',
              type=ImageCount('batch'))
@click.option('--channels', help='Width of the first U-Net level (model_channels)', metavar='INT',
              type=_int('channels'))
@click.option('--dropout', help='Dropout rate inside the U-Net blocks', metavar='FLOAT', type=_float('dropout'))
@click.option('--P_mean', 'P_mean', help='Mean of ln(sigma) for training noise levels', metavar='FLOAT',
              type=_float('P_mean'))
@click.option('--P_std', 'P_std', help='Spread of ln(sigma) for training noise levels', metavar='FLOAT',
              type=_float('P_std'))
@click.option('--lr', help='Peak learning rate (alpha_ref)', metavar='FLOAT', type=_float('lr'))
@click.option('--decay', help='Batches after which the learning rate starts to fall as 1/sqrt (t_ref; 0 = never)',
              metavar='BATCHES', type=_float('decay'))
# Performance (published names).
@click.option('--batch-gpu', help='Cap on images per process per pass; the rest is gradient accumulation',
              metavar='NIMG', type=ImageCount('batch_gpu'))
@click.option('--fp16', help='Half-precision U-Net on CUDA (shorthand for --precision fp16 or fp32)',
              metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--ls', help='Factor applied to the loss before backpropagation', metavar='FLOAT', type=_float('ls'),
              default=1, show_default=True)
@click.option('--bench', help='Let cuDNN pick the fastest kernels', metavar='BOOL', type=bool, default=True,
              show_default=True)
# Outputs (published names).
@click.option('--status', help='Images between progress lines in log.txt / stats.jsonl', metavar='NIMG',
              type=ImageCount('status'), default='128Ki', show_default=True)
@click.option('--snapshot', help='Images between EMA snapshots (0 = only the last one)', metavar='NIMG',
              type=ImageCount('snapshot'), default='8Mi', show_default=True)
@click.option('--checkpoint', help='Images between resumable training states (0 = only at the end)',
              metavar='NIMG', type=ImageCount('checkpoint'), default='128Mi', show_default=True)
@click.option('--seed', help='Seeds weights, data order and noise', metavar='INT', type=_int('seed'), default=0,
              show_default=True)
@click.option('-n', '--dry-run', help='Show the resolved settings and parameter count, write nothing', is_flag=True)
# Additions of this project.
@click.option('--precision', help='Arithmetic of the U-Net on every device (CPU included), overriding --fp16',
              type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--compile', 'compile_unet', help='torch.compile the U-Net, forward and backward (the first step '
              'compiles; its time is logged)', is_flag=True)
@click.option('--device', help='Where to train, e.g. cpu or cuda:1 (default: CUDA if present)', metavar='STR')
@click.option('--ema-stds', help='Relative lengths sigma_rel of the tracked EMAs', metavar='LIST',
              callback=_ema_lengths, default='0.050,0.100', show_default=True)
@click.option('--rampup', help='Images over which the learning rate grows linearly from zero', metavar='NIMG',
              type=ImageCount('rampup'), default='10M', show_default=True)
@click.option('--workers', help='Image-reading processes per rank (0 = read in the training process)',
              metavar='INT', type=_int('workers'), default=2, show_default=True)
@click.option('--snapshot-dtype', help='Float type of EMA weights written to snapshots',
              type=click.Choice(['fp16', 'fp32']), default='fp16', show_default=True)
@click.option('--channel-mult', help='Width factor of each U-Net level [default: 1,2,3,4]', metavar='LIST',
              callback=_integer_list('channel_mult', allow_empty=False))
@click.option('--num-blocks', help='Residual blocks per U-Net level [default: 3]', metavar='INT',
              type=_int('num_blocks'))
@click.option('--attn-res', help='Resolutions that get self-attention ("" for none) [default: 16,8]',
              metavar='LIST', callback=_integer_list('attn_res', allow_empty=True))
# Watching the run (training.watching): grids, metrics, loggers. All off by default.
@click.option('--grid', help='Images between sample grids grid-KIMG.png (0 = none; the first at the start)',
              metavar='NIMG', type=ImageCount('grid'), default='0', show_default=True)
@click.option('--grid-seeds', help='Seeds of the grid columns (classes spread over the labels)', metavar='LIST',
              callback=_seeds, default='0-7', show_default=True)
@click.option('--grid-steps', help='Heun steps of the grid images', metavar='INT', type=_int('grid_steps'),
              default=32, show_default=True)
@click.option('--grid-gnet', help='Guide for a second, autoguided row per EMA length: a snapshot file or a run '
              "folder (its newest snapshot)", metavar='PATH')
@click.option('--grid-guidance', help='Guidance weight of the autoguided rows', metavar='FLOAT',
              type=_float('grid_guidance'), default=2.0, show_default=True)
@click.option('--eval', 'eval_', help='Images between metric evaluations (0 = none; a multiple of --snapshot)',
              metavar='NIMG', type=ImageCount('eval'), default='0', show_default=True)
@click.option('--eval-ref', help='Reference statistics of the metrics (calculate_metrics.py ref)', metavar='PKL|NPZ|URL')
@click.option('--eval-metrics', help='Metrics: fid, fd_dinov2, precision, recall', metavar='LIST',
              callback=_metric_names, default='fid', show_default=True)
@click.option('--eval-num', help='Images generated per EMA length and evaluation (seeds 0..N-1)', metavar='INT',
              type=_int('eval_num'), default=5000, show_default=True)
@click.option('--eval-steps', help='Heun steps of the evaluated images', metavar='INT', type=_int('eval_steps'),
              default=32, show_default=True)
@click.option('--eval-stds', help='EMA lengths evaluated; untracked ones are reconstructed post hoc  '
              '[default: --ema-stds]', metavar='LIST', callback=_ema_lengths)
@click.option('--eval-batch', help='Images per sampling and detector batch per process', metavar='INT',
              type=_int('eval_batch'), default=32, show_default=True)
@click.option('--inception-weights', help='Inception-v3 FID weights (as calculate_metrics.py)', metavar='PATH')
@click.option('--dinov2-weights', help='DINOv2 ViT-L/14 weights (as calculate_metrics.py)', metavar='PATH')
@click.option('--logger', help='Experiment tracker; repeat for both (extras: tensorboard, wandb)',
              type=click.Choice(LOGGERS), multiple=True)
@click.option('--wandb-project', help='W&B project  [default: edm2]', metavar='STR')
@click.option('--wandb-name', help='W&B run name  [default: the run folder name]', metavar='STR')
@click.option('--wandb-group', help='W&B group', metavar='STR')
def main(outdir, data, cond, preset, duration, batch, channels, dropout, P_mean, P_std, lr, decay, batch_gpu,
         fp16, ls, bench, status, snapshot, checkpoint, seed, dry_run, precision, compile_unet, device, ema_stds,
         rampup, workers, snapshot_dtype, channel_mult, num_blocks, attn_res, eval_, **watch):
    """Train an EDM2 model, writing power-function EMA snapshots and resumable checkpoints.

    Hyper-parameters come from --preset (default edm2-img512-s, as in the release: EDM2-S on ImageNet-512
    latents); any of them given on the command line wins.
    """
    values = {}
    if preset:
        try:
            values.update(presets.get('train', preset))
        except presets.PresetError as e:
            raise click.BadParameter(str(e), param_hint='--preset') from None
    given = dict(duration=duration, batch=batch, channels=channels, dropout=dropout, P_mean=P_mean, P_std=P_std,
                 lr=lr, decay=decay)
    values.update({k: v for k, v in given.items() if v is not None})
    if values.get('duration') is None:
        raise click.UsageError('--duration is required with --preset ""')
    network = dict(channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_res)
    try:
        opts = TrainingOptions(
            outdir=outdir, data=data, cond=cond, batch_gpu=batch_gpu, ls=ls, bench=bench, status=status,
            snapshot=snapshot, checkpoint=checkpoint, seed=seed, device=device, ema_stds=ema_stds, rampup=rampup,
            workers=workers, snapshot_dtype=snapshot_dtype, precision=precision or ('fp16' if fp16 else 'fp32'),
            precision_scope='cuda' if precision is None else 'all', compile=compile_unet,
            network={k: v for k, v in network.items() if v is not None}, eval=eval_, **watch, **values)
        training_loop(opts, dry_run=dry_run)
    except EDM2Error as e:
        report = e.report if isinstance(e, TrainingError) else 'rank0'
        if report == 'self' or (report == 'rank0' and dist.is_main()):
            if dist.get_world_size() == 1:
                fail(e)
            report_rank_error(e)  # every rank that met the cause prints its own line, before the shutdown
        raise SystemExit(1) from None
    finally:
        dist.shutdown()


if __name__ == '__main__':
    main()
