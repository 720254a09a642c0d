"""The text-to-image branch of `generate_images.py`: its flags (`text_options`) and the run of a `diffusers:` main
model (`run`), with the one-line refusals of what cannot apply, all before any network is built.

Images are `{prompt:04d}-{seed:06d}.png` (the prompt's line in `prompts.txt`, written beside them), so a
rerun with `--skip-existing` resumes; a folder whose `prompts.txt` lists other prompts is refused then.
"""

import os

import click
import PIL.Image
import torch

from edm2 import distributed, presets, sampling
from edm2.commands import cli
from edm2.errors import EDM2Error
from edm2.fileio import atomic_write, atomic_write_text, is_complete_png
from edm2.self_guides import is_self_guide

UNCOND = 'uncond'
PROMPTS_FILE = 'prompts.txt'
PROMPT_MAX = 100000  # prompts × seeds are enumerated lazily; the prompts themselves are held in memory


def text_options(fn):
    """--prompt --prompt-file --negative-prompt --solver --schedule --stage2 --stage3."""
    options = [
        click.option('--prompt', 'prompts', metavar='TEXT', multiple=True,
                     help='A prompt of a text-to-image --net (diffusers:...); repeat for several. Every prompt '
                          'is generated with every seed.'),
        click.option('--prompt-file', metavar='FILE', help='Prompts, one per line (empty lines skipped).'),
        click.option('--negative-prompt', metavar='TEXT', default='', show_default=True,
                     help="The prompt of --gnet uncond (classifier-free guidance's guide); empty by default."),
        click.option('--solver', type=click.Choice(sampling.SOLVERS), default='heun', show_default=True,
                     help="'heun' (2N - 1 evaluations) or 'euler' (N; with --schedule model a diffusers model's "
                          'own DDIM / flow-matching Euler run).'),
        click.option('--schedule', type=click.Choice(('edm', 'model')), default='edm', show_default=True,
                     help="'edm': the rho-schedule (EDM paper eq. 5; for a diffusers model between its own "
                          "sigma_min and sigma_max); 'model': the noise levels of a diffusers model's own "
                          'scheduler for --steps.'),
        click.option('--stage2', metavar='diffusers:...',
                     help='IF only: continue through this super-resolution stage (e.g. '
                          'diffusers:DeepFloyd/IF-II-L-v1.0) with its own CFG.'),
        click.option('--stage3', metavar='diffusers:...',
                     help='IF only, after --stage2: the x4 upscaler (diffusers:stabilityai/stable-diffusion-x4-upscaler).'),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def is_text_run(setup) -> bool:
    from edm2.external.specs import is_diffusers_spec
    return is_diffusers_spec(setup.net)


def refuse_for_edm2(setup, prompts, prompt_file, schedule, stage2, stage3):
    """The text-to-image flags with an EDM2 --net: one line each."""
    from edm2.external.specs import is_diffusers_spec
    given = [flag for flag, value in (('--prompt', prompts), ('--prompt-file', prompt_file), ('--stage2', stage2),
                                      ('--stage3', stage3)) if value]
    if schedule == 'model':
        given.append('--schedule model')
    if given:
        raise click.UsageError(f'{given[0]} needs a diffusers text-to-image model (--net diffusers:...)')
    for gnet in setup.gnets:
        if gnet == UNCOND:
            raise click.BadParameter("'uncond' is classifier-free guidance of a diffusers text-to-image --net; an "
                                     "EDM2 network's unconditional guide is a network file of its own",
                                     param_hint="'--gnet'")
        if is_diffusers_spec(gnet):
            raise click.BadParameter(f'{gnet}: a diffusers guide needs a diffusers main model (--net diffusers:...)',
                                     param_hint="'--gnet'")


def read_prompts(prompts, prompt_file) -> list:
    texts = list(prompts)
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding='utf-8') as f:
                texts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            cli.fail(e, f'--prompt-file {prompt_file}')
    if not texts:
        raise click.UsageError('a text-to-image model needs --prompt or --prompt-file')
    if len(texts) > PROMPT_MAX:
        raise click.BadParameter(f'{len(texts)} prompts; at most {PROMPT_MAX}', param_hint="'--prompt-file'")
    for text in texts:
        if '\n' in text or '\r' in text:
            raise click.BadParameter(f'{text[:40]!r}...: a prompt is one line', param_hint="'--prompt'")
    return texts


def image_name(prompt_index, seed) -> str:
    return f'{prompt_index:04d}-{seed:06d}.png'


def _check_models(setup, stage2, stage3):
    """Read every configuration and check the pairs; returns (main info, guide infos by spec)."""
    from edm2.external import specs
    try:
        main = specs.read_model(setup.net)
    except EDM2Error as e:
        cli.fail(e, '--net')
    guides = {}
    for gnet in setup.gnets:
        if gnet == UNCOND:
            continue
        if is_self_guide(gnet):
            raise click.BadParameter(f'{gnet}: self guides perturb the blocks of EDM2 networks; a diffusers model '
                                     "is guided by 'uncond' or another diffusers model", param_hint="'--gnet'")
        if not specs.is_diffusers_spec(gnet):
            raise click.BadParameter(f'{gnet}: a diffusers main model is guided by diffusers models or '
                                     "'uncond'", param_hint="'--gnet'")
        try:
            guides[gnet] = specs.read_model(gnet)
            specs.check_guide(main, guides[gnet])
        except EDM2Error as e:
            cli.fail(e, '--gnet')
    if stage3 and not stage2:
        raise click.UsageError('--stage3 continues --stage2: give both')
    for flag, spec in (('--stage2', stage2), ('--stage3', stage3)):
        if spec is None:
            continue
        if main.family.name != 'if':
            raise click.BadParameter(f'super-resolution stages continue DeepFloyd IF stage I; the main model is a '
                                     f'{main.pipeline}', param_hint=f"'{flag}'")
        try:
            specs.read_stage(spec)
        except EDM2Error as e:
            cli.fail(e, flag)
    return main, guides


def _check_flags(args):
    ctx = click.get_current_context()
    explicit = [f'--{name}' for name in ('sigma_min', 'sigma_max')
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if explicit:
        raise click.UsageError(f'{explicit[0]}: a diffusers model is sampled between its own sigma_min and '
                               'sigma_max (--schedule edm) or at its scheduler\'s levels (--schedule model)')
    refused = [('--class', args['class_idx'] is not None), ('--labels balanced', args['label_rule'] != 'random'),
               ('--labels-out', args['labels_out']), ('--npz', args['npz']), ('--grid', args['grid']),
               ('--subdirs', args['subdirs'])]
    for flag, given in refused:
        if given:
            raise click.UsageError(f'{flag} does not apply to text-to-image runs (images are named by prompt and seed)')
    if args['outdir'] is None:
        raise click.UsageError('give --outdir')


def _preset_defaults(setup, args):
    """A text-to-image preset may also name its stage II and its schedule; flags given explicitly win."""
    if setup.preset is None:
        return
    entry, ctx = presets.get('generate', setup.preset), click.get_current_context()
    for key in ('stage2', 'schedule'):
        if key in entry and ctx.get_parameter_source(key) != click.core.ParameterSource.COMMANDLINE:
            args[key] = entry[key]
    if args['schedule'] not in ('edm', 'model'):
        raise click.BadParameter(f"preset {setup.preset!r}: schedule must be 'edm' or 'model'", param_hint="'--preset'")


def _check_prompt_record(outdir, texts, skip_existing):
    path = os.path.join(outdir, PROMPTS_FILE)
    if skip_existing and os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            if f.read().splitlines() != texts:
                raise click.BadParameter(f'{path} lists other prompts than this run: the images there would not '
                                         'match their names', param_hint="'--skip-existing'")


def run(setup, args):
    """The whole text-to-image run of generate_images.py; `args` are the command's parameters by name."""
    _check_flags(args)
    _preset_defaults(setup, args)
    texts = read_prompts(args['prompts'], args['prompt_file'])
    if args['negative_prompt'] and UNCOND not in setup.gnets:
        raise click.UsageError('--negative-prompt is the prompt of --gnet uncond: give that guide (and --guidance)')
    main_info, guide_infos = _check_models(setup, args['stage2'], args['stage3'])
    if setup.interval is not None:  # a step interval outside the schedule (N + 1 levels whatever the schedule)
        from edm2.commands import guidance_setup
        guidance_setup.check_schedule(setup, torch.zeros(args['num_steps'] + 1))
    outdir, skip_existing = args['outdir'], args['skip_existing']
    cli.check_output(outdir, '--outdir', True)
    _check_prompt_record(outdir, texts, skip_existing)
    from edm2.external import loading
    try:
        loading.require_extra(f'--net {setup.net}:')
    except EDM2Error as e:
        cli.fail(e)
    try:
        options = sampling.HeunOptions(S_churn=args['S_churn'], S_min=args['S_min'], S_max=args['S_max'],
                                       S_noise=args['S_noise'], solver=args['solver'])
        device = distributed.init(args['device'])
    except (sampling.SamplingError, distributed.DeviceError) as e:
        cli.fail(e)
    cli.hold_for_command(outdir)
    with distributed.rank0_first():  # a hub download happens once; the other ranks then read the cache
        sampler, decode, stages = _build(setup, main_info, guide_infos, texts, args, options, device)
    if distributed.is_main():
        os.makedirs(outdir, exist_ok=True)
        atomic_write_text(os.path.join(outdir, PROMPTS_FILE), ''.join(t + '\n' for t in texts))
    skip = (lambda p, s: is_complete_png(os.path.join(outdir, image_name(p, s)))) if skip_existing else None
    from edm2.external.text_to_image import generate_text_images
    seeds = args['seeds']
    distributed.print0(f'Generating {len(texts)} prompt(s) x {len(seeds)} seed(s) to "{outdir}" ...')
    written = 0
    with torch.no_grad():
        try:
            for batch in generate_text_images(sampler, seeds, decode=decode, stages=stages,
                                              batch_size=args['batch_size'], rank=distributed.get_rank(),
                                              world_size=distributed.get_world_size(), skip=skip, progress=True):
                written += _write(batch, outdir, skip)
        except sampling.SamplingError as e:
            cli.fail(e)
    distributed.print0(f'Done: {written} images written by rank 0.' if distributed.get_world_size() > 1
                       else f'Done: {written} images written.')
    distributed.barrier()
    distributed.shutdown()


def _write(batch, outdir, skip) -> int:
    if batch.images is None:
        return 0
    written = 0
    for (p, s), image in zip(batch.keys, batch.images):
        if skip is not None and skip(p, s):
            continue
        with atomic_write(os.path.join(outdir, image_name(p, s))) as f:
            PIL.Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(f, format='PNG')
        written += 1
    return written


def _build(setup, main_info, guide_infos, texts, args, options, device):
    """Load the networks (main first, then guides), encode the prompts, make the schedule, the decoder and the
    stages. Errors of the libraries are one line naming the model."""
    from edm2.external import loading
    from edm2.external.denoisers import UncondGuide
    from edm2.external.text_to_image import TextSampler, encode_prompts
    try:
        distributed.print0(f'Loading {setup.net} ...')
        net = loading.load_denoiser(main_info.spec, device, info=main_info)
        prompts = encode_prompts(net, texts, args['negative_prompt'], device)
        guides = []
        for gnet in setup.gnets:
            if gnet == UNCOND:
                guides.append(UncondGuide(net, prompts.negative))
            else:
                distributed.print0(f'Loading guiding model {gnet} ...')
                guides.append(loading.load_denoiser(guide_infos[gnet].spec, device, info=guide_infos[gnet],
                                                    text=False))
        if args['schedule'] == 'model':
            sigmas = net.model_schedule(args['num_steps'])
        else:
            sigmas = sampling.edm_schedule(args['num_steps'], net.sigma_min, net.sigma_max, args['rho'])
        guidance = sampling.Guidance(guides=tuple(guides), weight=setup.weight, shares=setup.shares,
                                     interval=setup.interval, rule=setup.rule)
        decode = loading.LatentDecoder(main_info, device, net.dtype).pixels if main_info.family.latent else None
        stages = [loading.SuperResolution(spec, device) for spec in (args['stage2'], args['stage3']) if spec]
        sampler = TextSampler(net, prompts, guidance=guidance, sigmas=sigmas, options=options, device=device)
    except (EDM2Error, sampling.SamplingError) as e:
        cli.fail(e)
    return sampler, decode, stages
