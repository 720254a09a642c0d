"""The guidance axes of an autoguidance sweep besides the networks and w: the combination rule
(`edm2.guidance_rules`) and the guidance interval (Kynkäänniemi et al., NeurIPS 2024, who tune its bounds
together with w). Each cell records both as canonical spec strings ('lerp', 'apg:eta=0,momentum=0,threshold=0';
'sigma:0.28,2.9', 'steps:17,22', or null for every step guided), so that a cell keeps its meaning whatever
lists a later run asks for: adding a value adds cells, removing one leaves its cells unused.

    interval_spec(interval) / parse_interval_spec(spec)   an interval <-> its spec string
    interval_flags(spec)                                    the command-line flags that set it
    cell_defaults(outdir)                                   what a cell written before these axes existed means
"""

import json
import os

from edm2 import sampling


def interval_spec(interval):
    """None (every step guided), SigmaInterval or StepInterval -> None, 'sigma:LO,HI' or 'steps:FIRST,LAST'."""
    if interval is None:
        return None
    if isinstance(interval, sampling.SigmaInterval):
        return f'sigma:{float(interval.lo)!r},{float(interval.hi)!r}'
    return f'steps:{int(interval.first)},{int(interval.last)}'


def parse_interval_spec(spec):
    """The inverse of `interval_spec`."""
    if spec is None:
        return None
    kind, _, values = str(spec).partition(':')
    lo, hi = values.split(',')
    if kind == 'sigma':
        return sampling.SigmaInterval(float(lo), float(hi))
    return sampling.StepInterval(int(lo), int(hi))


def interval_flags(spec):
    """['--guidance-interval', 'LO,HI'], ['--guidance-interval-steps', 'FIRST,LAST'] or [] for a spec."""
    if spec is None:
        return []
    kind, _, values = str(spec).partition(':')
    if kind == 'sigma':
        return ['--guidance-interval', ','.join(f'{float(v):g}' for v in values.split(','))]
    return ['--guidance-interval-steps', values]


def legacy_interval(fixed):
    """The one interval of a sweep.json written before the interval was an axis (its `fixed` settings)."""
    if fixed.get('--guidance-interval') is not None:
        return interval_spec(sampling.SigmaInterval(*fixed['--guidance-interval']))
    if fixed.get('--guidance-interval-steps') is not None:
        return interval_spec(sampling.StepInterval(*fixed['--guidance-interval-steps']))
    return None


LEGACY_FIXED = ('--guidance-interval', '--guidance-interval-steps')  # settings that became the interval axis


def cell_defaults(outdir):
    """{'rule', 'interval'}: the meaning of a cell record of `outdir` that lacks these fields (written before
    they were axes): lerp, and the interval that sweep.json then held as a fixed setting. Kept in sweep.json
    as `cell_defaults` from then on."""
    defaults = {'rule': 'lerp', 'interval': None}
    path = os.path.join(outdir, 'sweep.json')
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):  # no folder yet; an unreadable one is refused by check_resume
        return defaults
    if not isinstance(doc, dict):
        return defaults
    if isinstance(doc.get('cell_defaults'), dict):
        return dict(defaults, **doc['cell_defaults'])
    return dict(defaults, interval=legacy_interval(doc.get('fixed') or {}))
