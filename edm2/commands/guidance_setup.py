"""The guidance front end shared by the generating commands (`generate_images.py`, `calculate_metrics.py gen`).

One place decides, from a `--preset` and the explicit flags, which networks guide with which weight,
interval and rule: `guidance_options` declares the flags, `resolve` merges them with the preset (explicit
flags win; w = 1 drops the guides, so they are neither loaded nor evaluated), and `load_networks` loads the
networks on rank 0 first (a download happens once; the other ranks then read the cache), makes the `self:`
guides from the main network (`edm2.self_guides`) and checks the guides against the main network. Errors
are one-line click errors naming the flag.
"""

import dataclasses
import math
from typing import Optional

import click

from edm2 import distributed, presets, sampling
from edm2.commands import cli
from edm2.guidance_rules import Lerp, Rule, RuleError, parse_rule
from edm2.self_guides import SelfGuideError, is_self_guide, parse_self_guide


class IntervalType(click.ParamType):
    """'LO,HI' -> (lo, hi): 0 <= LO <= HI, LO finite, HI finite or inf."""
    name = 'LO,HI'

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(float(v) for v in value)
        parts = str(value).split(',')
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError:
            self.fail(f'expected two numbers LO,HI, got {value!r}', param, ctx)
        error = cli.check_range(lo, 0) or (cli.check_range(hi, lo) if hi != math.inf else None)
        if error:
            self.fail(f'{error} (need 0 <= LO <= HI; HI may be inf)', param, ctx)
        return lo, hi


class StepsType(click.ParamType):
    """'FIRST,LAST' -> (first, last): 0 <= FIRST <= LAST, inclusive step indices."""
    name = 'FIRST,LAST'

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(int(v) for v in value)
        try:
            first, last = (int(p) for p in str(value).split(','))
        except ValueError:
            self.fail(f'expected two step indices FIRST,LAST, got {value!r}', param, ctx)
        if not 0 <= first <= last:
            self.fail(f'need 0 <= FIRST <= LAST, got {first},{last}', param, ctx)
        return first, last


class RuleType(click.ParamType):
    """A guidance rule spec ('lerp', 'apg:eta=0,momentum=-0.5,threshold=15', 'rescale:phi=0.7') -> the rule."""
    name = 'SPEC'

    def convert(self, value, param, ctx):
        try:
            return parse_rule(value)
        except RuleError as e:
            self.fail(str(e), param, ctx)


def _shares(ctx, param, value):
    return None if value is None else tuple(cli.parse_number_list(value, "'--guide-weights'", lo=0, hi=1))


def guidance_options(fn):
    """The click options --preset --net --gnet --guidance --guide-weights --guidance-interval
    --guidance-interval-steps --guidance-rule (None or empty when not given, so that `resolve` sees what was
    explicit)."""
    options = [
        click.option('--preset', metavar='NAME',
                     help='Named setting from configs/generate.toml (networks, weight, interval); flags given '
                          'explicitly take precedence.'),
        click.option('--net', metavar='PATH|URL',
                     help='The network that generates: a .safetensors file of this project or a published '
                          '.pkl snapshot, local or by URL; or a text-to-image model saved by diffusers, '
                          "'diffusers:PATH_OR_HUB_ID[#SUBFOLDER]' (see docs/external-models.md)."),
        click.option('--gnet', metavar='PATH|URL|self:...', multiple=True,
                     help='A network that guides the main one; repeat the flag to guide with several. '
                          "'self:pag' perturbs the main network's self-attention (every attention block, or "
                          "'self:pag=enc.8x8_block1,dec.8x8_in0'), 'self:skip=BLOCKS' skips blocks of it: "
                          'guides made from the main network, without a copy of its weights. With a diffusers '
                          "--net: 'diffusers:...' (a model of the same family and input) or 'uncond' "
                          '(classifier-free guidance: the main model with the empty / --negative-prompt).'),
        click.option('--guidance', metavar='FLOAT', type=cli.Float(0, 100), default=None,
                     help='Guidance weight w; 1 turns guidance off and loads no guide.  [default: 1, or the '
                          "preset's]"),
        click.option('--guide-weights', metavar='LIST', default=None, callback=_shares,
                     help='With several --gnet, how the extra weight w - 1 is shared among them (numbers >= 0 '
                          'that add up to 1).  [default: equal shares]'),
        click.option('--guidance-interval', metavar='LO,HI', type=IntervalType(), default=None,
                     help='Guide only the steps whose noise level sigma_i lies in (LO, HI].'),
        click.option('--guidance-interval-steps', metavar='FIRST,LAST', type=StepsType(), default=None,
                     help='Guide only steps FIRST..LAST (inclusive, counted from 0); an alternative to '
                          '--guidance-interval.'),
        click.option('--guidance-rule', metavar='SPEC', type=RuleType(), default=None,
                     help="How the main and guide outputs combine: 'lerp' (D0 + w (D1 - D0)), "
                          "'apg:eta=0,momentum=-0.5,threshold=15' (adaptive projected guidance; any subset of "
                          "the keys, default 0) or 'rescale:phi=0.7' (guidance rescale).  [default: lerp, or "
                          "the preset's]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@dataclasses.dataclass(frozen=True)
class GuidanceSetup:
    """What the preset and the flags resolve to, before any network is loaded."""

    net: str
    gnets: tuple                 # paths/URLs of the guides to load; empty when the weight is 1
    weight: float
    shares: Optional[tuple]
    interval: Optional[sampling.Interval]
    preset: Optional[str] = None
    rule: Rule = Lerp()          # `edm2.guidance_rules`

    def describe(self) -> dict:
        """The settings as plain JSON values (for result files)."""
        sigma = self.interval if isinstance(self.interval, sampling.SigmaInterval) else None
        steps = self.interval if isinstance(self.interval, sampling.StepInterval) else None
        return dict(preset=self.preset, net=self.net, gnet=list(self.gnets) or None, guidance=self.weight,
                    guide_weights=None if self.shares is None else list(self.shares),
                    guidance_interval=None if sigma is None else [sigma.lo, sigma.hi],
                    guidance_interval_steps=None if steps is None else [steps.first, steps.last],
                    guidance_rule=str(self.rule))


def _preset_values(name):
    try:
        entry = presets.get('generate', name)
    except presets.PresetError as e:
        raise click.BadParameter(str(e), param_hint="'--preset'") from None
    gnet = entry.get('gnet')
    gnet = () if gnet is None else (gnet,) if isinstance(gnet, str) else tuple(gnet)
    interval = None
    try:
        if entry.get('guidance_interval') is not None:
            interval = sampling.SigmaInterval(*(float(v) for v in entry['guidance_interval']))
        if entry.get('guidance_interval_steps') is not None:
            interval = sampling.StepInterval(*(int(v) for v in entry['guidance_interval_steps']))
    except (TypeError, sampling.SamplingError) as e:
        raise click.BadParameter(f'preset {name!r}: {e}', param_hint="'--preset'") from None
    try:
        rule = parse_rule(entry.get('guidance_rule', 'lerp'))
    except RuleError as e:
        raise click.BadParameter(f'preset {name!r}: {e}', param_hint="'--preset'") from None
    shares = entry.get('guide_weights')
    return dict(net=entry.get('net'), gnet=gnet, guidance=float(entry.get('guidance', 1.0)),
                shares=None if shares is None else tuple(float(a) for a in shares), interval=interval, rule=rule)


def resolve(preset=None, net=None, gnet=(), guidance=None, guide_weights=None, guidance_interval=None,
            guidance_interval_steps=None, guidance_rule=None) -> GuidanceSetup:
    """Merge the preset with the flags given explicitly (None / empty = not given). Either interval flag
    replaces the preset's interval; giving both is a usage error. `self:` guides are parsed here (their
    block names are checked against the network in `load_networks`)."""
    if guidance_interval is not None and guidance_interval_steps is not None:
        raise click.UsageError('give --guidance-interval or --guidance-interval-steps, not both')
    base = _preset_values(preset) if preset is not None else dict(net=None, gnet=(), guidance=1.0, shares=None,
                                                                 interval=None, rule=Lerp())
    net = net if net is not None else base['net']
    gnets = tuple(gnet) if gnet else base['gnet']
    gnets = tuple(_canonical_gnet(g, "'--gnet'" if gnet else "'--preset'") for g in gnets)
    rule = parse_rule(guidance_rule) if guidance_rule is not None else base['rule']
    weight = float(guidance) if guidance is not None else base['guidance']
    shares = guide_weights if guide_weights is not None else (base['shares'] if not gnet else None)
    interval = base['interval']
    if guidance_interval is not None:
        interval = sampling.SigmaInterval(*guidance_interval)
    elif guidance_interval_steps is not None:
        interval = sampling.StepInterval(*guidance_interval_steps)
    if net is None:
        raise click.UsageError('give --net or --preset')
    if weight != 1 and not gnets:
        raise click.UsageError(f'--guidance {weight:g} needs a guiding network (--gnet)')
    if weight == 1:  # the one place deciding that w = 1 neither loads nor evaluates a guide
        gnets, shares = (), None
    elif shares is not None:
        try:
            sampling.guide_shares(len(gnets), shares)
        except sampling.SamplingError as e:
            raise click.BadParameter(str(e), param_hint="'--guide-weights'") from None
    return GuidanceSetup(net=net, gnets=gnets, weight=weight, shares=shares, interval=interval, preset=preset,
                         rule=rule)


def _canonical_gnet(value, hint):
    """A guide path as given, or a `self:` spec in its canonical form (a bad one is a usage error)."""
    if not is_self_guide(value):
        return value
    try:
        return str(parse_self_guide(value))
    except SelfGuideError as e:
        raise click.BadParameter(str(e), param_hint=hint) from None


def check_schedule(setup: GuidanceSetup, sigmas) -> None:
    """Refuse an interval of steps that lies outside the schedule, before any work."""
    if setup.interval is not None:
        try:
            setup.interval.select(sigmas)
        except sampling.SamplingError as e:
            raise click.BadParameter(str(e), param_hint="'--guidance-interval-steps'") from None


def _load(path, device, flag):
    from edm2.checkpoint import load_snapshot  # the checkpoint module is heavy; load it when networks are needed
    if path == 'uncond' or path.strip().startswith('diffusers:'):  # text-to-image models: generate_images.py
        cli.fail(f'{path}: text-to-image models (diffusers:, uncond) are sampled by generate_images.py only', flag)
    try:
        net, encoder, _ = load_snapshot(path, device=device)
    except ValueError as e:  # CheckpointError, EncoderError: bad or unreachable file
        cli.fail(e, f'{flag} {path}')
    return net.eval().requires_grad_(False), encoder


def load_networks(setup: GuidanceSetup, device):
    """(net, encoder, sampling.Guidance): rank 0 loads (and downloads) first, the other ranks after it."""
    with distributed.rank0_first():
        distributed.print0(f'Loading network from {setup.net} ...')
        net, encoder = _load(setup.net, device, '--net')
        guides = []
        for path in setup.gnets:
            if is_self_guide(path):
                try:
                    guides.append(parse_self_guide(path).bind(net))
                except SelfGuideError as e:
                    raise click.BadParameter(str(e), param_hint="'--gnet'") from None
                distributed.print0(f'Guiding with {path}: the main network, perturbed ...')
                continue
            distributed.print0(f'Loading guiding network from {path} ...')
            guide, _ = _load(path, device, '--gnet')
            try:
                sampling.check_guide(net, guide)
            except sampling.SamplingError as e:
                cli.fail(e, f'--gnet {path}')
            guides.append(guide)
    guidance = sampling.Guidance(guides=tuple(guides), weight=setup.weight, shares=setup.shares,
                                 interval=setup.interval, rule=setup.rule)
    return net, encoder, guidance
