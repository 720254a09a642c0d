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
\b
  # several training seeds: mean and range per method, beside the release procedure's seeds 0-2
  python toy_example.py demo --seeds 0,1,2 --outdir out/toy-seeds
\b
  # guidance rules: autoguidance under lerp, APG and rescale at one weight (docs/toy-rules.png)
  python toy_example.py eval --models out/toy --guidance-rule apg:eta=0 --out out/toy/eval-apg.json
  python toy_example.py rules --release --ideal --out docs/toy-rules.png
"""

import json
import os
import sys
import time

import click
import torch

from edm2 import toy
from edm2.commands.cli import Float, Group, Int, check_file_name, check_output, fail, parse_number_list
from edm2.distributed import default_device
from edm2.commands.guidance_setup import RuleType
from edm2.errors import EDM2Error
from edm2.fileio import atomic_write_text, remove_stale_temporaries
from edm2.guidance_rules import Lerp
from edm2.limits import SEED_MAX
from edm2.phema import SIGMA_REL_MAX, SIGMA_REL_MIN
from edm2.toy.figure import draw_figure, draw_rules_figure, pyplot
from edm2.toy.reference import GROUND_TRUTH_RESULT, as_row, summarise
from edm2 import jsontext

MODEL_FILES = {'net': 'main', 'autoguide': 'autoguide', 'cfg_guide': 'cfg-guide'}
# Guidance weights of the paper's Figure 1 (autoguidance, CFG, naive truncation).
PUBLISHED_WEIGHTS = dict(ag=3.0, cfg=4.0, trunc=1.5)
# The rules compared by `rules` (docs/toy-rules.png): the paper's lerp, APG with its parallel part dropped
# (eta = 0, no momentum or cap), and guidance rescale with phi = 0.7 (Lin et al.'s recommended value).
RULES_FIGURE_RULES = ('lerp', 'apg:eta=0', 'rescale:phi=0.7')

# Memory per sample of an evaluation or figure (all methods' samples and their statistics; lower estimate),
# per step of the sampler (the noise levels), per dot-per-inch of a figure row (RGBA pixels: 15 x 3.35 inches).
EVAL_SAMPLE_BYTES = 256
STEP_BYTES = 16


def _training_bytes(p):
    return toy.training_bytes(p['width'], p['layers'], p['batch'])


def _dpi_bytes(p):
    return 4 * 15 * 3.35 * 3 * p['dpi']  # RGBA, up to three rows of 15 x 3.35 inches: per dpi, dpi x area


METRIC_COLUMNS = [('outlier_rate', 'outliers', '{:.2%}'), ('leaf_coverage', 'leaf coverage', '{:.1%}'),
                  ('branch_tv', 'branch TV', '{:.3f}'), ('mean_loglik', 'mean log-lik', '{:.2f}'),
                  ('median_loglik', 'median log-lik', '{:.2f}')]


LEGEND = ('outliers: samples where the ground truth\'s density is below its 99%-mass level; leaf coverage: leaf '
          'branches of the tree receiving at least half their expected share of the in-distribution samples; '
          'branch TV: total '
          'variation distance between the samples\' and the ground truth\'s histograms over the branches '
          '(0 = same distribution, 1 = disjoint)')


def pick_device(device):
    try:
        return default_device(device)
    except EDM2Error as e:
        fail(e)


def need_matplotlib():
    try:
        pyplot()
    except EDM2Error as e:
        fail(e)


def train_one(outdir, name, classes, width, layers, iterations, batch, lr, ema, seed, device, quiet=False):
    from tqdm import tqdm
    os.makedirs(outdir, exist_ok=True)
    remove_stale_temporaries(outdir)  # of runs that were killed
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
            fail(e)
    return loaded


def load_one(path, flag, device):
    try:
        return toy.load_model(path, device)[0]
    except toy.ToyModelError as e:
        fail(e, flag)


def draw_models(out, loaded, weights, num, seed, steps, device, dpi, rule=None):
    """One row: ground truth, loaded['net'] unguided and, when loaded has an 'autoguide', autoguided."""
    net = loaded['net']
    guide = loaded.get('autoguide', net)
    samples = toy.sample_methods(net, guide, guide, num=num, seed=seed, ag_weight=weights['ag'],
                                 cfg_weight=weights['cfg'], trunc_weight=weights['trunc'], num_steps=steps,
                                 device=device, rule=rule)
    names = ['ground truth', 'unguided'] + (['autoguidance'] if 'autoguide' in loaded else [])
    mixture = toy.gt('A')
    level = toy.outlier_level(mixture)
    samples = {name: samples[name] for name in names}
    results = {name: toy.evaluate(x, mixture, level) for name, x in samples.items()}
    draw_figure(out, [(None, samples, results)], level, weights, max_points=num, dpi=dpi)


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


def check_finite(samples, what):
    """Refuse, in one line, samples that are not all finite (a rule or weight that makes sampling diverge):
    their metrics would be meaningless (100% outliers, NaN likelihoods)."""
    for name, x in samples.items():
        bad = int((~torch.isfinite(x).all(dim=-1)).sum())
        if bad:
            fail(f'{what} {name}: {bad} of {len(x)} samples are not finite (sampling diverged); lower the '
                 f'guidance weight or choose another rule')


def echo_legend():
    click.echo(click.wrap_text(LEGEND, width=110) + '\n')


def run_eval(models, num, seed, steps, weights, device, rule=None):
    samples = toy.sample_methods(models['net'], models['autoguide'], models['cfg_guide'], num=num, seed=seed,
                                 ag_weight=weights['ag'], cfg_weight=weights['cfg'], trunc_weight=weights['trunc'],
                                 num_steps=steps, device=device, rule=rule)
    check_finite(samples, f'weights {", ".join(f"{k}={v:g}" for k, v in weights.items())}, method')
    mixture = toy.gt('A')
    level = toy.outlier_level(mixture)
    results = {name: toy.evaluate(x, mixture, level) for name, x in samples.items()}
    return samples, results, level


def write_json(path, results, level, settings, **extra):
    data = dict(settings=settings, outlier_logp_level=level, results=results, **extra)
    atomic_write_text(path, jsontext.dumps(data, f'{path}', indent=2) + '\n')


IDEAL_LABEL = (f'idealised models: ground truth blurred by {toy.IDEAL_MAIN_BLUR:g} (main), '
               f'{toy.IDEAL_GUIDE_BLUR:g} (guides)')
ROW_LABELS = ('ours, trained (published settings)', f'idealised (blur {toy.IDEAL_MAIN_BLUR:g} / {toy.IDEAL_GUIDE_BLUR:g})',
              "release procedure's models (seed 0)")


# ---- command line --------------------------------------------------------------------------------------

@click.group(cls=Group, help=__doc__)
def cli():
    pass


def model_options(f):
    f = click.option('--cfg-guide', metavar='FILE', help='CFG guide (default: DIR/cfg-guide.safetensors).')(f)
    f = click.option('--autoguide', '--gnet', 'autoguide', metavar='FILE',
                     help='Autoguidance guide (default: DIR/autoguide.safetensors; --gnet is the release\'s name).')(f)
    f = click.option('--net', metavar='FILE', help='Main model (default: DIR/main.safetensors).')(f)
    f = click.option('--models', metavar='DIR', type=click.Path(file_okay=False),
                     help='Folder with main/autoguide/cfg-guide.safetensors (as written by demo).')(f)
    f = click.option('--ideal', is_flag=True,
                     help=f'Use idealised models instead of trained ones: the exact ground truth blurred by '
                          f'{toy.IDEAL_MAIN_BLUR:g} (main) and {toy.IDEAL_GUIDE_BLUR:g} (guides).')(f)
    return f


def sampling_options(f):
    f = click.option('--guidance-rule', 'rule', default='lerp', show_default=True, type=RuleType(),
                     help="How each guided method combines main and guide denoisers D = x + sigma^2 score: "
                          "'lerp', 'apg:eta=E,momentum=B,threshold=R' or 'rescale:phi=P' (edm2.guidance_rules).")(f)
    f = click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')(f)
    f = click.option('--steps', default=32, show_default=True, type=Int(1, item_bytes=STEP_BYTES, item='step'),
                     help='Heun steps.')(f)
    f = click.option('--seed', default=0, show_default=True, type=Int(0, SEED_MAX), help='Seed of the initial noise.')(f)
    f = click.option('--trunc-weight', default=PUBLISHED_WEIGHTS['trunc'], show_default=True, type=Float(),
                     help='Naive truncation: the score is scaled by this.')(f)
    f = click.option('--cfg-weight', default=PUBLISHED_WEIGHTS['cfg'], show_default=True, type=Float(), help='CFG guidance weight w.')(f)
    f = click.option('--ag-weight', '--guidance', 'ag_weight', default=PUBLISHED_WEIGHTS['ag'], show_default=True,
                     type=Float(), help='Autoguidance weight w (--guidance is the release\'s name).')(f)
    return f


@cli.command()
@click.option('--classes', '--cls', 'classes', default='A', show_default=True,
              help='Training data: A, B, or AB (both trees). --cls is the release\'s name.')
@click.option('--layers', default=4, show_default=True, help='Hidden layers.',
              type=Int(1, item_bytes=lambda p: _training_bytes(p) / p['layers'], item='layer'))
@click.option('--width', '--dim', 'width', default=64, show_default=True,
              help='Hidden width (--dim is the release\'s name).',
              type=Int(1, item_bytes=lambda p: _training_bytes(p) / p['width'], item='unit of width'))
@click.option('--iterations', default=4096, show_default=True,
              type=Int(1, item_bytes=toy.ITERATION_BYTES, item='iteration'))
@click.option('--batch', default=4096, show_default=True,
              type=Int(1, item_bytes=lambda p: _training_bytes(p) / p['batch'], item='sample'))
@click.option('--lr', default=0.01, show_default=True, type=Float(0, lo_open=True))
@click.option('--ema', default=0.010, show_default=True, type=Float(SIGMA_REL_MIN, SIGMA_REL_MAX, hi_open=True),
              help='Power-function EMA length sigma_rel.')
@click.option('--seed', default=0, show_default=True, type=Int(0, SEED_MAX))
@click.option('--outdir', required=True, type=click.Path(file_okay=False), help='Output folder.')
@click.option('--name', default=None, help='File name stem [default: toy-CLASSES-LAYERSxWIDTH-ITERATIONS].')
@click.option('--viz', is_flag=True, help='Also draw the trained model\'s unguided samples over the ground truth: '
              'OUTDIR/NAME.png (the release shows a live window instead).')
@click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')
def train(classes, layers, width, iterations, batch, lr, ema, seed, outdir, name, viz, device):
    """Train one toy model by exact score matching; writes OUTDIR/NAME.safetensors."""
    if classes not in toy.CLASSES:
        raise click.BadParameter(f'unknown class {classes!r}; expected one of {", ".join(toy.CLASSES)}',
                                 param_hint='--classes')
    name = name or f'toy-{classes}-{layers}x{width}-{iterations}'
    check_file_name(name, '--name', suffix='.safetensors')  # a name, never a path out of --outdir
    check_output(outdir, '--outdir', folder=True)
    device = pick_device(device)
    if viz:
        need_matplotlib()
    path = train_one(outdir, name, classes, width, layers, iterations, batch, lr, ema, seed, device)
    click.echo(f'wrote {path}')
    if viz:
        png = os.path.splitext(path)[0] + '.png'
        draw_models(png, {'net': toy.load_model(path, device)[0]}, PUBLISHED_WEIGHTS, 6000, seed, 32, device, 90)
        click.echo(f'wrote {png}')


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
@click.option('--num', default=20000, show_default=True, type=Int(1, item_bytes=EVAL_SAMPLE_BYTES, item='sample'),
              help='Samples per method.')
@click.option('--out', default=None, type=click.Path(dir_okay=False), help='JSON output [default: DIR/eval.json].')
def eval_cmd(ideal, models, net, autoguide, cfg_guide, ag_weight, cfg_weight, trunc_weight, seed, steps, device, rule,
             num, out):
    """Outlier rate, leaf-branch coverage and log-likelihood of every method; prints a table, writes JSON."""
    device = pick_device(device)
    loaded = get_models(ideal, models, net, autoguide, cfg_guide, device)
    if out is None and models is not None and os.path.exists(os.path.join(models, 'eval.json')):
        raise click.UsageError(f'{os.path.join(models, "eval.json")} exists (written by demo?): give --out FILE '
                               f'(naming it replaces it)')
    out = default_output(out, models, 'eval.json')
    weights = dict(ag=ag_weight, cfg=cfg_weight, trunc=trunc_weight)
    _, results, level = run_eval(loaded, num, seed, steps, weights, device, rule)
    click.echo(format_table(results, weights))
    echo_legend()
    write_json(out, results, level, dict(num=num, seed=seed, steps=steps, weights=weights, ideal=ideal,
                                         guidance_rule=str(rule)))
    click.echo(f'wrote {out}')


@cli.command()
@model_options
@sampling_options
@click.option('--num', default=6000, show_default=True, type=Int(1, item_bytes=EVAL_SAMPLE_BYTES, item='sample'),
              help='Samples per panel.')
@click.option('--out', '--save', 'out', default=None, type=click.Path(dir_okay=False),
              help='PNG output [default: DIR/toy.png] (--save is the release\'s name).')
@click.option('--dpi', default=90, show_default=True, type=Int(1, item_bytes=_dpi_bytes, item='dot per inch'))
def plot(ideal, models, net, autoguide, cfg_guide, ag_weight, cfg_weight, trunc_weight, seed, steps, device, rule, num,
         out, dpi):
    """The panels of Figure 1: ground truth, unguided, CFG, autoguidance, naive truncation."""
    device = pick_device(device)
    need_matplotlib()
    weights = dict(ag=ag_weight, cfg=cfg_weight, trunc=trunc_weight)
    if not ideal and models is None and net is not None and cfg_guide is None:
        # The release's form, `plot --net FILE [--gnet FILE] --guidance W --save PNG`: ground truth, the
        # network unguided and, with a guide, autoguided.
        if out is None:
            raise click.UsageError('give --save FILE (or --out FILE)')
        loaded = {'net': load_one(net, '--net', device)}
        if autoguide is not None:
            loaded['autoguide'] = load_one(autoguide, '--gnet', device)
        draw_models(out, loaded, weights, num, seed, steps, device, dpi, rule)
        click.echo(f'wrote {out}')
        return
    loaded = get_models(ideal, models, net, autoguide, cfg_guide, device)
    out = default_output(out, models, 'toy.png')
    samples, results, level = run_eval(loaded, num, seed, steps, weights, device, rule)
    label = ' '.join(part for part in (ROW_LABELS[1] if ideal else None,
                                        None if isinstance(rule, Lerp) else f'rule {rule}') if part)
    draw_figure(out, [(label or None, samples, results)], level, weights, max_points=num, dpi=dpi)
    click.echo(f'wrote {out}')


def format_comparison(columns, weights):
    """Outliers %, leaf coverage % and branch TV per method, one column group per (title, {method: row})."""
    labels = {'ground truth': 'ground truth', 'unguided': 'unguided', 'CFG': f'CFG (w={weights["cfg"]:g})',
              'autoguidance': f'autoguidance (w={weights["ag"]:g})',
              'naive truncation': f'naive trunc. (w={weights["trunc"]:g})'}
    head = f'{"":<24s}' + ''.join(f'{title:>26s}' for title, _ in columns)
    sub = f'{"method":<24s}' + f'{"outl. %  leaf %    TV":>26s}' * len(columns)
    lines = [head, sub, '-' * len(sub)]
    for name in toy.METHODS:
        cells = [f'{row[0]:8.2f} {row[1]:7.1f} {row[2]:7.3f}' if row else '-'
                 for row in (rows.get(name) for _, rows in columns)]
        lines.append(f'{labels[name]:<24s}' + ''.join(f'{c:>26s}' for c in cells))
    return '\n'.join(lines)


def format_summary(title, per_seed):
    """Mean [min, max] over seeds of outliers %, leaf coverage % and branch TV, per method."""
    lines = [f'{title} (mean [min, max] over seeds {", ".join(map(str, per_seed))}):',
             f'{"method":<20s}{"outliers %":>24s}{"leaf coverage %":>24s}{"branch TV":>24s}']
    for name, cols in summarise(per_seed).items():
        cells = [f'{m:6.2f} [{lo:6.2f}, {hi:6.2f}]' if k < 2 else f'{m:6.3f} [{lo:6.3f}, {hi:6.3f}]'
                 for k, (m, lo, hi) in enumerate(cols)]
        lines.append(f'{name:<20s}' + ''.join(f'{c:>24s}' for c in cells))
    return '\n'.join(lines)


def train_models(outdir, seed, main_iterations, guide_iterations, batch, retrain, device):
    """Train (or reuse) the three models of Figure 1 in `outdir` with the published settings; training
    seeds: main `seed`, autoguide `seed + 1`, CFG guide `seed + 2`. Returns (models, whether all were reused)."""
    jobs = [('main', 'A', 64, main_iterations, seed),
            ('autoguide', 'A', 32, guide_iterations, seed + 1),
            ('cfg-guide', 'AB', 32, guide_iterations, seed + 2)]
    reused = True
    for name, classes, width, iterations, s in jobs:
        path = os.path.join(outdir, f'{name}.safetensors')
        if not retrain and os.path.isfile(path):
            try:
                old, meta = toy.load_model(path)
                if ((meta.get('classes'), meta.get('iterations'), meta.get('batch'), meta.get('seed'),
                     old.init_kwargs['width']) == (classes, iterations, batch, s, width)):
                    click.echo(f'reusing {path}')
                    continue
            except toy.ToyModelError:
                pass
        reused = False
        train_one(outdir, name, classes, width, 4, iterations, batch, 0.01, 0.010, s, device)
    return resolve_models(outdir, None, None, None, device), reused


def evaluate_seed(folder, seed, settings, weights, retrain, device):
    """Results of one seed's trained models; an eval.json written by an earlier run with the same settings
    is reused when its models were."""
    models, reused = train_models(folder, seed, settings['main_iterations'], settings['guide_iterations'],
                                  settings['batch'], retrain, device)
    path = os.path.join(folder, 'eval.json')
    settings = dict(settings, seed=seed, steps=32, weights=weights)
    if reused and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get('settings') == settings and set(old.get('results', {})) == set(toy.METHODS):
            click.echo(f'reusing {path}')
            return old['results']
    _, results, level = run_eval(models, settings['num'], seed, 32, weights, device)
    write_json(path, results, level, settings)
    return results


def demo_seeds(outdir, seeds, settings, retrain, device):
    """`demo --seeds`: train and evaluate every seed (models in OUTDIR/seed-N), print mean and range per
    method beside the release procedure's, and check what holds on every seed of the release."""
    weights = PUBLISHED_WEIGHTS
    per_seed = {}
    for seed in seeds:
        folder = os.path.join(outdir, f'seed-{seed}')
        results = evaluate_seed(folder, seed, settings, weights, retrain, device)
        per_seed[seed] = {name: as_row(r) for name, r in results.items()}
        click.echo(f'seed {seed} (models in {folder}):\n{format_table(results, weights)}\n')
    release, source = toy.release_results()
    click.echo(format_summary('ours, published settings', per_seed) + '\n')
    click.echo(format_summary('release procedure (reference data)', release))
    click.echo(f'  ({toy.reference.PROVENANCE}; read from {source})\n')
    for title, data in [('ours', per_seed), ('release procedure', release)]:
        click.echo(f'checks on {title}:')
        for text, holds in toy.seed_checks(data):
            click.echo(f'  {"holds" if holds else "DOES NOT HOLD"}: {text}')
    return per_seed


def demo_rows(loaded, seed, num, weights, device):
    """[(label, samples, results)] of the figure: our trained models, the release procedure's models of
    seed 0 (package data; the row is left out if the file is missing), the idealised models."""
    rows = []
    release = toy.release_models()
    steps_total = 3 if release is not None else 2
    t0 = time.time()

    def step(k, what):
        click.echo(f'evaluating {k}/{steps_total}: {what}, {num} samples per method x 5 methods '
                   f'({time.time() - t0:.0f} s so far)', err=True)
    step(1, 'the trained models')
    samples, results, level = run_eval(loaded, num, seed, 32, weights, device)
    rows.append((ROW_LABELS[0], samples, results))
    if release is not None:
        step(2, "the release procedure's models")
        release = {k: v.to(device) for k, v in release.items()}
        rows.append((ROW_LABELS[2], *run_eval(release, num, seed, 32, weights, device)[:2]))
    step(steps_total, 'the idealised models')
    rows.append((ROW_LABELS[1], *run_eval(toy.ideal_models(), num, seed, 32, weights, device)[:2]))
    click.echo(f'evaluation done ({time.time() - t0:.0f} s); drawing the figure', err=True)
    return rows, level


@cli.command()
@click.option('--outdir', default='out/toy-demo', show_default=True, type=click.Path(file_okay=False))
@click.option('--main-iterations', default=4096, show_default=True, help='Training iterations of the main model '
              '(published: 4096).', type=Int(1, item_bytes=toy.ITERATION_BYTES, item='iteration'))
@click.option('--guide-iterations', default=512, show_default=True, help='Training iterations of both guides '
              '(published: 512).', type=Int(1, item_bytes=toy.ITERATION_BYTES, item='iteration'))
@click.option('--batch', default=4096, show_default=True,
              type=Int(1, item_bytes=toy.sample_bytes(64, 4), item='sample'))  # the main model is the largest
@click.option('--num', default=20000, show_default=True, type=Int(1, item_bytes=EVAL_SAMPLE_BYTES, item='sample'),
              help='Samples per method for the evaluation (the figure shows the first 6000).')
@click.option('--seed', default=0, show_default=True, type=Int(0, SEED_MAX),
              help='Training seed (main; the guides use seed+1, seed+2) and sampling seed.')
@click.option('--seeds', default=None, metavar='LIST',
              help='Several seeds, e.g. 0,1,2: train and evaluate each (models in OUTDIR/seed-N) and print mean '
                   'and range per method; no figure.')
@click.option('--retrain/--reuse', default=False, show_default=True,
              help='Retrain models already present in OUTDIR (default: reuse them).')
@click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')
def demo(outdir, main_iterations, guide_iterations, batch, num, seed, seeds, retrain, device):
    """Train the main model and both guides with the published settings, evaluate and plot them beside the
    release procedure's results (reference data) and the idealised models (--ideal of eval/plot)."""
    check_output(outdir, '--outdir', folder=True)
    device = pick_device(device)
    t0 = time.time()
    settings = dict(num=num, main_iterations=main_iterations, guide_iterations=guide_iterations, batch=batch)
    if seeds is not None:
        values = parse_number_list(seeds, '--seeds', lo=0, hi=SEED_MAX - 2)  # the guides use seed + 1, seed + 2
        if any(v != int(v) for v in values):
            raise click.BadParameter(f'expected whole numbers, got {seeds!r}', param_hint='--seeds')
        demo_seeds(outdir, sorted(set(int(v) for v in values)), settings, retrain, device)
        click.echo(f'done ({time.time() - t0:.0f} s)')
        return
    need_matplotlib()
    loaded, _ = train_models(outdir, seed, main_iterations, guide_iterations, batch, retrain, device)
    weights = PUBLISHED_WEIGHTS
    rows, level = demo_rows(loaded, seed, num, weights, device)
    results, ideal_results = rows[0][2], rows[-1][2]
    click.echo(f'trained models (published settings):\n{format_table(results, weights)}\n')
    click.echo(f'{IDEAL_LABEL}:\n{format_table(ideal_results, weights)}\n')
    release, source = toy.release_results()
    columns = [(f'ours, seed {seed}', {k: as_row(r) for k, r in results.items()})]
    if seed in release:
        columns.append((f'release, seed {seed}', dict(release[seed], **{'ground truth': GROUND_TRUTH_RESULT})))
    columns.append(('idealised', {k: as_row(r) for k, r in ideal_results.items()}))
    click.echo(f'comparison:\n{format_comparison(columns, weights)}\n'
               f'release: reference data, {toy.reference.PROVENANCE} (read from {source})\n')
    echo_legend()
    extra = dict(ideal=dict(main_blur=toy.IDEAL_MAIN_BLUR, guide_blur=toy.IDEAL_GUIDE_BLUR, results=ideal_results))
    if len(rows) == 3:
        extra['release_models_seed0'] = rows[1][2]
    write_json(os.path.join(outdir, 'eval.json'), results, level,
               dict(settings, seed=seed, steps=32, weights=weights), **extra)
    draw_figure(os.path.join(outdir, 'toy.png'), rows, level, weights)
    click.echo(f'wrote {outdir}/eval.json and {outdir}/toy.png ({time.time() - t0:.0f} s)')


def rules_rows(trained, release, ideal, rules, weight, num, seed, steps, device):
    """[(label, {spec: samples}, {spec: results})] of `rules`, one row per model set asked for, and the
    outlier level. The autoguidance pairs: our trained main/autoguide, the release procedure's of seed 0,
    the idealised ones."""
    sets = []
    if trained is not None:
        models = resolve_models(trained, None, None, None, device)
        sets.append((f'trained models ({trained})', models))
    if release:
        models = toy.release_models()
        if models is None:
            raise click.UsageError(f'--release: no release-models-seed0.pt in {toy.reference.data_dir()} '
                                   f'(package data of edm2; reinstall the package)')
        sets.append((ROW_LABELS[2], {k: v.to(device) for k, v in models.items()}))
    if ideal:
        sets.append((ROW_LABELS[1], toy.ideal_models()))
    if not sets:
        raise click.UsageError('give at least one of --models DIR, --release, --ideal')
    mixture = toy.gt('A')
    level = toy.outlier_level(mixture)
    rows = []
    for label, models in sets:
        samples = toy.sample_rules(models['net'], models['autoguide'], rules, w=weight, num=num, seed=seed,
                                   num_steps=steps, device=device)
        check_finite(samples, f'{label}, --ag-weight {weight:g}, --guidance-rule')
        rows.append((label, samples, {spec: toy.evaluate(x, mixture, level) for spec, x in samples.items()}))
    return rows, level


def format_rules(rows):
    head = f'{"models":<40s}{"rule":<36s}{"outliers":>10s}{"branch TV":>11s}{"leaf coverage":>15s}'
    lines = [head, '-' * len(head)]
    for label, _, results in rows:
        for spec, r in results.items():
            lines.append(f'{label[:39]:<40s}{spec:<36s}{r["outlier_rate"]:>10.2%}{r["branch_tv"]:>11.3f}'
                         f'{r["leaf_coverage"]:>15.1%}')
    return '\n'.join(lines)


@cli.command()
@click.option('--models', metavar='DIR', type=click.Path(file_okay=False),
              help='Trained models: DIR/main.safetensors guided by DIR/autoguide.safetensors (as written by demo).')
@click.option('--release', is_flag=True,
              help="The release procedure's trained models of seed 0 (package data, edm2/toy/data).")
@click.option('--ideal', is_flag=True, help='The idealised models (ground truth blurred, no training).')
@click.option('--guidance-rule', 'rules', multiple=True, type=RuleType(), default=RULES_FIGURE_RULES,
              show_default=True, help='A rule to compare; repeat the flag for several (one panel each).')
@click.option('--ag-weight', default=PUBLISHED_WEIGHTS['ag'], show_default=True, type=Float(),
              help='Autoguidance weight w, the same for every rule.')
@click.option('--num', default=20000, show_default=True, type=Int(1, item_bytes=EVAL_SAMPLE_BYTES, item='sample'),
              help='Samples per rule for the numbers (the figure shows the first 6000).')
@click.option('--seed', default=0, show_default=True, type=Int(0, SEED_MAX), help='Seed of the initial noise.')
@click.option('--steps', default=32, show_default=True, type=Int(1, item_bytes=STEP_BYTES, item='step'),
              help='Heun steps.')
@click.option('--out', required=True, type=click.Path(dir_okay=False),
              help='PNG output; the numbers go to the same name with .json.')
@click.option('--dpi', default=90, show_default=True, type=Int(1, item_bytes=_dpi_bytes, item='dot per inch'))
@click.option('--device', default=None, help='torch device [default: cuda if available, else cpu].')
def rules(models, release, ideal, rules, ag_weight, num, seed, steps, out, dpi, device):
    """Autoguidance under several guidance rules at one weight: a row of panels per model set, each with its
    outlier rate and branch TV (seeded: the same command gives the same figure and numbers)."""
    device = pick_device(device)
    need_matplotlib()
    rules = list(dict.fromkeys(rules))  # canonical rule objects; a repeated one is drawn once
    rows, level = rules_rows(models, release, ideal, rules, ag_weight, num, seed, steps, device)
    click.echo(format_rules(rows))
    echo_legend()
    json_path = os.path.splitext(out)[0] + '.json'
    settings = dict(num=num, seed=seed, steps=steps, ag_weight=ag_weight, rules=[str(r) for r in rules])
    write_json(json_path, {label: results for label, _, results in rows}, level, settings)
    draw_rules_figure(out, rows, level, ag_weight, dpi=dpi)
    click.echo(f'wrote {out} and {json_path}')


if __name__ == '__main__':
    cli()
