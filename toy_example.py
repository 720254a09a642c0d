"""The 2D toy example of the autoguidance paper (Figure 1): train, evaluate, plot, or all at once (demo).

Examples:

\b
  # everything: trains the main model and both guides with the published settings, evaluates, plots
  python toy_example.py demo --outdir out/toy-demo
\b
  # the pieces
  python toy_example.py train --classes A  --width 64 --iterations 4096 --outdir out/toy --name main
  python toy_example.py train --classes A  --width 32 --iterations 512  --outdir out/toy --name autoguide
  python toy_example.py train --classes AB --width 32 --iterations 512  --outdir out/toy --name cfg-guide
  python toy_example.py eval --models out/toy --out out/toy/eval.json
  python toy_example.py plot --models out/toy --out out/toy/toy.png
\b
  # the same with idealised models (exact ground truth, blurred; no training)
  python toy_example.py eval --ideal --out out/toy/eval-ideal.json
"""

import json
import os
import sys
import time

import click
import torch

from edm2 import toy
from edm2.fileio import atomic_path, atomic_write

MODEL_FILES = {'net': 'main', 'autoguide': 'autoguide', 'cfg_guide': 'cfg-guide'}
METRIC_COLUMNS = [('outlier_rate', 'outliers', '{:.2%}'), ('leaf_coverage', 'leaf coverage', '{:.1%}'),
                  ('branch_tv', 'branch TV', '{:.3f}'), ('mean_loglik', 'mean log-lik', '{:.2f}'),
                  ('median_loglik', 'median log-lik', '{:.2f}')]


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def check_device(device):
    try:
        dev = torch.device(device)
        if dev.type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError
        torch.empty(1, device=dev)
    except Exception:
        raise click.BadParameter(f'device {device!r} is not available here', param_hint='--device') from None
    return dev


def positive(name):
    def check(ctx, param, value):
        if value is not None and value <= 0:
            raise click.BadParameter(f'must be positive, got {value}', param_hint=name)
        return value
    return check


def train_one(outdir, name, classes, width, layers, iterations, batch, lr, ema, seed, device, quiet=False):
    from tqdm import tqdm
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f'{name}.safetensors')
    bar = tqdm(total=iterations, desc=f'{name} ({classes}, width {width})', disable=quiet, leave=True,
               dynamic_ncols=True, file=sys.stderr)

    def progress(it, loss):
        bar.update(1)
        if it % 64 == 0:
            bar.set_postfix(loss=f'{loss:.4f}')

    t0 = time.time()
    try:
        net, _, losses = toy.train(classes=classes, width=width, layers=layers, iterations=iterations, batch=batch,
                                   lr=lr, ema_std=ema, seed=seed, device=device, progress=progress)
    finally:
        bar.close()
    toy.save_model(path, net, classes=classes, iterations=iterations, batch=batch, lr=lr, ema_std=ema, seed=seed,
                   final_loss=sum(losses[-64:]) / len(losses[-64:]), train_seconds=round(time.time() - t0, 1))
    return path


def resolve_models(models, net, autoguide, cfg_guide, device):
    paths = dict(net=net, autoguide=autoguide, cfg_guide=cfg_guide)
    for key, stem in MODEL_FILES.items():
        if paths[key] is None:
            if models is None:
                flag = '--' + key.replace('_', '-')
                raise click.UsageError(f'no trained model for {flag}: give {flag} FILE or --models DIR '
                                       f'(a folder written by `toy_example.py demo`, containing {stem}.safetensors)')
            paths[key] = os.path.join(models, f'{stem}.safetensors')
    loaded = {}
    for key, path in paths.items():
        try:
            loaded[key] = toy.load_model(path, device)[0]
        except toy.ToyModelError as e:
            raise click.ClickException(str(e)) from None
    return loaded


def get_models(ideal, models, net, autoguide, cfg_guide, device):
    """The idealised models (--ideal) or the trained ones."""
    if not ideal:
        return resolve_models(models, net, autoguide, cfg_guide, device)
    if any(v is not None for v in (models, net, autoguide, cfg_guide)):
        raise click.UsageError('--ideal uses no trained models: drop --models/--net/--autoguide/--cfg-guide')
    return toy.ideal_models()


def format_table(results, weights):
    labels = {'ground truth': 'ground truth', 'unguided': 'unguided',
              'CFG': f'CFG (w={weights["cfg"]:g}, A+B guide)',
              'autoguidance': f'autoguidance (w={weights["ag"]:g})',
              'naive truncation': f'naive truncation (w={weights["trunc"]:g})'}
    head = f'{"method":<28s}' + ''.join(f'{title:>16s}' for _, title, _ in METRIC_COLUMNS)
    lines = [head, '-' * len(head)]
    for name, r in results.items():
        lines.append(f'{labels[name]:<28s}' + ''.join(f'{fmt.format(r[key]):>16s}' for key, _, fmt in METRIC_COLUMNS))
    return '\n'.join(lines)


def run_eval(models, num, seed, steps, weights, device):
    samples = toy.sample_methods(models['net'], models['autoguide'], models['cfg_guide'], num=num, seed=seed,
                                 ag_weight=weights['ag'], cfg_weight=weights['cfg'], trunc_weight=weights['trunc'],
                                 num_steps=steps, device=device)
    mixture = toy.gt('A')
    level = toy.outlier_level(mixture)
    results = {name: toy.evaluate(x, mixture, level) for name, x in samples.items()}
    return samples, results, level


def write_json(path, results, level, settings, **extra):
    data = dict(settings=settings, outlier_logp_level=level, results=results, **extra)
    with atomic_write(path, 'w') as f:
        f.write(json.dumps(data, indent=2) + '\n')


IDEAL_LABEL = (f'idealised models: ground truth blurred by {toy.IDEAL_MAIN_BLUR:g} (main), '
               f'{toy.IDEAL_GUIDE_BLUR:g} (guides)')
ROW_LABELS = ('trained (published settings)', f'idealised (blur {toy.IDEAL_MAIN_BLUR:g} / {toy.IDEAL_GUIDE_BLUR:g})')


def draw_figure(path, rows, level, weights, max_points=6000, dpi=90):
    """rows: [(label or None, samples, results)], one row of the five panels each."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException('plotting needs matplotlib: pip install -e ".[toy]"') from None
    mixture = toy.gt('A')
    lo, hi = (-0.65, -0.55), (1.6, 1.45)
    res = 240
    gx = torch.linspace(lo[0], hi[0], res, dtype=torch.float64)
    gy = torch.linspace(lo[1], hi[1], res, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(gx, gy, indexing='xy'), dim=-1).reshape(-1, 2)
    grid = (gx.numpy(), gy.numpy(), mixture.logp(points).reshape(res, res).numpy())
    titles = {'ground truth': '(a) ground truth, class A', 'unguided': '(b) unguided',
              'CFG': f'(c) CFG, w={weights["cfg"]:g}', 'autoguidance': f'(d) autoguidance, w={weights["ag"]:g}',
              'naive truncation': f'(e) naive truncation, w={weights["trunc"]:g}'}
    ncols = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.0 * ncols, 3.35 * len(rows)), squeeze=False)
    for (label, samples, results), row in zip(rows, axes):
        if label:
            row[0].set_ylabel(label, fontsize=8.5)
        for ax, (name, x) in zip(row, samples.items()):
            draw_panel(ax, x, results[name], titles[name], mixture, grid, level, max_points)
    fig.tight_layout(pad=0.4)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format='png')
    finally:
        plt.close(fig)


def draw_panel(ax, x, r, title, mixture, grid, level, max_points):
    """Ground truth's 99%-mass region (light blue), the samples (black) and the outliers among them (red)."""
    gx, gy, dens = grid
    ax.contourf(gx, gy, dens, levels=[level, dens.max() + 1], colors=['#dfe7f2'])
    ax.contour(gx, gy, dens, levels=[level], colors=['#8ba3c7'], linewidths=0.5)
    x = x[:max_points].numpy()
    out = mixture.logp(torch.as_tensor(x, dtype=torch.float64)).numpy() < level
    ax.scatter(x[~out, 0], x[~out, 1], s=0.6, c='#1b1b1b', linewidths=0, rasterized=True)
    ax.scatter(x[out, 0], x[out, 1], s=1.5, c='#d62728', linewidths=0, rasterized=True)
    ax.set_title(f'{title}\noutliers {r["outlier_rate"]:.1%}, leaf coverage {r["leaf_coverage"]:.0%}', fontsize=8.5)
    ax.set_xlim(gx[0], gx[-1])
    ax.set_ylim(gy[0], gy[-1])
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])


# ---- command line --------------------------------------------------------------------------------------

@click.group(help=__doc__)
def cli():
    pass


def model_options(f):
    f = click.option('--cfg-guide', metavar='FILE', help='CFG guide (default: DIR/cfg-guide.safetensors).')(f)
    f = click.option('--autoguide', metavar='FILE', help='Autoguidance guide (default: DIR/autoguide.safetensors).')(f)
    f = click.option('--net', metavar='FILE', help='Main model (default: DIR/main.safetensors).')(f)
    f = click.option('--models', metavar='DIR', type=click.Path(file_okay=False),
                     help='Folder with main/autoguide/cfg-guide.safetensors (as written by demo).')(f)
    f = click.option('--ideal', is_flag=True,
                     help=f'Use idealised models instead of trained ones: the exact ground truth blurred by '
                          f'{toy.IDEAL_MAIN_BLUR:g} (main) and {toy.IDEAL_GUIDE_BLUR:g} (guides).')(f)
    return f


def sampling_options(f):
    f = click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')(f)
    f = click.option('--steps', default=32, show_default=True, type=int, callback=positive('--steps'),
                     help='Heun steps.')(f)
    f = click.option('--seed', default=0, show_default=True, type=int, help='Seed of the initial noise.')(f)
    f = click.option('--trunc-weight', default=1.5, show_default=True, type=float,
                     help='Naive truncation: the score is scaled by this.')(f)
    f = click.option('--cfg-weight', default=4.0, show_default=True, type=float, help='CFG guidance weight w.')(f)
    f = click.option('--ag-weight', default=3.0, show_default=True, type=float,
                     help='Autoguidance weight w.')(f)
    return f


@cli.command()
@click.option('--classes', default='A', show_default=True, help='Training data: A, B, or AB (both trees).')
@click.option('--layers', default=4, show_default=True, type=int, callback=positive('--layers'), help='Hidden layers.')
@click.option('--width', default=64, show_default=True, type=int, callback=positive('--width'), help='Hidden width.')
@click.option('--iterations', default=4096, show_default=True, type=int, callback=positive('--iterations'))
@click.option('--batch', default=4096, show_default=True, type=int, callback=positive('--batch'))
@click.option('--lr', default=0.01, show_default=True, type=float, callback=positive('--lr'))
@click.option('--ema', default=0.010, show_default=True, type=float, help='Power-function EMA length sigma_rel.')
@click.option('--seed', default=0, show_default=True, type=int)
@click.option('--outdir', required=True, type=click.Path(file_okay=False), help='Output folder.')
@click.option('--name', default=None, help='File name stem [default: toy-CLASSES-LAYERSxWIDTH-ITERATIONS].')
@click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')
def train(classes, layers, width, iterations, batch, lr, ema, seed, outdir, name, device):
    """Train one toy model by exact score matching; writes OUTDIR/NAME.safetensors."""
    if classes not in toy.CLASSES:
        raise click.BadParameter(f'unknown class {classes!r}; expected one of {", ".join(toy.CLASSES)}',
                                 param_hint='--classes')
    if not 0 < ema < 12 ** -0.5:
        raise click.BadParameter(f'must lie in (0, 0.2887), got {ema}', param_hint='--ema')
    device = check_device(device or default_device())
    name = name or f'toy-{classes}-{layers}x{width}-{iterations}'
    path = train_one(outdir, name, classes, width, layers, iterations, batch, lr, ema, seed, device)
    click.echo(f'wrote {path}')


def default_output(out, models, name):
    """`out` when given, else DIR/name for --models DIR."""
    if out is not None:
        return out
    if models is None:
        raise click.UsageError(f'give --out FILE (or --models DIR to write DIR/{name})')
    return os.path.join(models, name)


@cli.command('eval')
@model_options
@sampling_options
@click.option('--num', default=20000, show_default=True, type=int, callback=positive('--num'),
              help='Samples per method.')
@click.option('--out', default=None, type=click.Path(dir_okay=False), help='JSON output [default: DIR/eval.json].')
def eval_cmd(ideal, models, net, autoguide, cfg_guide, ag_weight, cfg_weight, trunc_weight, seed, steps, device, num, out):
    """Outlier rate, leaf-branch coverage and log-likelihood of every method; prints a table, writes JSON."""
    device = check_device(device or default_device())
    loaded = get_models(ideal, models, net, autoguide, cfg_guide, device)
    out = default_output(out, models, 'eval.json')
    weights = dict(ag=ag_weight, cfg=cfg_weight, trunc=trunc_weight)
    _, results, level = run_eval(loaded, num, seed, steps, weights, device)
    click.echo(format_table(results, weights))
    write_json(out, results, level, dict(num=num, seed=seed, steps=steps, weights=weights, ideal=ideal))
    click.echo(f'wrote {out}')


@cli.command()
@model_options
@sampling_options
@click.option('--num', default=6000, show_default=True, type=int, callback=positive('--num'),
              help='Samples per panel.')
@click.option('--out', default=None, type=click.Path(dir_okay=False), help='PNG output [default: DIR/toy.png].')
@click.option('--dpi', default=90, show_default=True, type=int, callback=positive('--dpi'))
def plot(ideal, models, net, autoguide, cfg_guide, ag_weight, cfg_weight, trunc_weight, seed, steps, device, num, out, dpi):
    """The panels of Figure 1: ground truth, unguided, CFG, autoguidance, naive truncation."""
    device = check_device(device or default_device())
    loaded = get_models(ideal, models, net, autoguide, cfg_guide, device)
    out = default_output(out, models, 'toy.png')
    weights = dict(ag=ag_weight, cfg=cfg_weight, trunc=trunc_weight)
    samples, results, level = run_eval(loaded, num, seed, steps, weights, device)
    draw_figure(out, [(ROW_LABELS[1] if ideal else None, samples, results)], level, weights, max_points=num, dpi=dpi)
    click.echo(f'wrote {out}')


@cli.command()
@click.option('--outdir', default='out/toy-demo', show_default=True, type=click.Path(file_okay=False))
@click.option('--main-iterations', default=4096, show_default=True, type=int, callback=positive('--main-iterations'),
              help='Training iterations of the main model (published: 4096).')
@click.option('--guide-iterations', default=512, show_default=True, type=int, callback=positive('--guide-iterations'),
              help='Training iterations of both guides (published: 512).')
@click.option('--batch', default=4096, show_default=True, type=int, callback=positive('--batch'))
@click.option('--num', default=20000, show_default=True, type=int, callback=positive('--num'),
              help='Samples per method for the evaluation (the figure shows the first 6000).')
@click.option('--seed', default=0, show_default=True, type=int)
@click.option('--retrain/--reuse', default=False, show_default=True,
              help='Retrain models already present in OUTDIR (default: reuse them).')
@click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')
def demo(outdir, main_iterations, guide_iterations, batch, num, seed, retrain, device):
    """Train the main model and both guides with the published settings, evaluate, and plot; the same for the
    idealised models (--ideal of eval/plot) as a second table and a second row of the figure."""
    device = check_device(device or default_device())
    t0 = time.time()
    jobs = [('main', 'A', 64, main_iterations, seed),
            ('autoguide', 'A', 32, guide_iterations, seed + 1),
            ('cfg-guide', 'AB', 32, guide_iterations, seed + 2)]
    for name, classes, width, iterations, s in jobs:
        path = os.path.join(outdir, f'{name}.safetensors')
        if not retrain and os.path.isfile(path):
            try:
                old, meta = toy.load_model(path)
                if ((meta.get('classes'), meta.get('iterations'), meta.get('batch'), old.init_kwargs['width'])
                        == (classes, iterations, batch, width)):
                    click.echo(f'reusing {path}')
                    continue
            except toy.ToyModelError:
                pass
        train_one(outdir, name, classes, width, 4, iterations, batch, 0.01, 0.010, s, device)
    loaded = resolve_models(outdir, None, None, None, device)
    weights = dict(ag=3.0, cfg=4.0, trunc=1.5)
    samples, results, level = run_eval(loaded, num, seed, 32, weights, device)
    ideal_samples, ideal_results, _ = run_eval(toy.ideal_models(), num, seed, 32, weights, device)
    click.echo(f'trained models (published settings):\n{format_table(results, weights)}\n')
    click.echo(f'{IDEAL_LABEL}:\n{format_table(ideal_results, weights)}')
    write_json(os.path.join(outdir, 'eval.json'), results, level,
               dict(num=num, seed=seed, steps=32, weights=weights, main_iterations=main_iterations,
                    guide_iterations=guide_iterations, batch=batch),
               ideal=dict(main_blur=toy.IDEAL_MAIN_BLUR, guide_blur=toy.IDEAL_GUIDE_BLUR, results=ideal_results))
    draw_figure(os.path.join(outdir, 'toy.png'),
                [(ROW_LABELS[0], samples, results), (ROW_LABELS[1], ideal_samples, ideal_results)],
                level, weights)
    click.echo(f'wrote {outdir}/eval.json and {outdir}/toy.png ({time.time() - t0:.0f} s)')


if __name__ == '__main__':
    cli()
