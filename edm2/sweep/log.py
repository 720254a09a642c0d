"""The files of a sweep's output folder: cells.jsonl (one JSON object per finished cell, appended and
flushed as each finishes) and sweep.json (settings; on resume, a setting that changes results must match).
"""

import contextlib
import json
import os

from edm2 import distributed
from edm2.errors import EDM2Error
from edm2.fileio import atomic_write, atomic_write_text, open_append, reporting_full_disk
from edm2.guidance_rules import RuleError, parse_rule
from edm2 import jsontext

from .axes import LEGACY_FIXED, interval_spec


class SweepError(EDM2Error):
    """Bad sweep request, or a setting that differs from the cells already in the output folder."""


def cell_key(net_std, gnet_std, guidance, rule='lerp', interval=None):
    """What identifies a cell: the axis values, EMA lengths and w rounded; rule and interval as spec strings
    (edm2.sweep.axes)."""
    r = (lambda v: None if v is None else round(float(v), 6))
    return r(net_std), r(gnet_std), r(guidance), str(rule), interval


def record_key(record, defaults=None):
    """The cell_key of a cells.jsonl record; `defaults` give the rule and interval of a record written before
    they were recorded (edm2.sweep.axes.cell_defaults). The rule is read back in its canonical spelling, so a
    record written before specs were normalised (e.g. 'momentum=-0') keys the same cell as today's spec."""
    defaults = defaults or {}
    rule = record.get('rule', defaults.get('rule', 'lerp'))
    with contextlib.suppress(RuleError, TypeError):  # what is no rule keeps its spelling: the cell is computed again
        rule = str(parse_rule(rule))
    return cell_key(record['net_std'], record['gnet_std'], record['guidance'], rule,
                    record.get('interval', defaults.get('interval')))


class CellLog:
    """The finished cells of an output folder. Reading drops a last line cut short by a killed process, and
    skips (saying so) a damaged line elsewhere: its cell is not finished and is computed again."""

    def __init__(self, path, defaults=None):
        self.path, self.defaults = path, defaults
        self.cells = {}
        self.partial = False
        if os.path.exists(path):
            with open(path, 'rb') as f:
                data = f.read()
            lines = data.split(b'\n')
            self.partial = lines[-1] != b''  # no final newline: that write was interrupted
            good, damaged = [], []
            for number, line in enumerate(lines[:-1], 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                        self.cells[record_key(rec, defaults)] = rec
                    except (ValueError, TypeError, KeyError, AttributeError):  # not JSON, not an object, or a field missing
                        damaged.append(number)
                        continue
                good.append(line + b'\n')
            if damaged:
                self.partial = True  # repair() rewrites the file without them
                distributed.print0(f'{path}: skipped damaged line(s) {", ".join(map(str, damaged))}; '
                                   f'{"that cell is" if len(damaged) == 1 else "those cells are"} computed again')
            self._good = b''.join(good)

    def repair(self):
        """Rank 0: rewrite the file without an interrupted last line or damaged lines."""
        if self.partial:
            with atomic_write(self.path, 'wb', fsync=True) as f:
                f.write(self._good)
            self.partial = False

    def append(self, record):
        self.cells[record_key(record, self.defaults)] = record
        if distributed.is_main():
            with reporting_full_disk(self.path), open_append(self.path) as f:  # a line cut short is dropped on resume
                f.write(jsontext.dumps(record, f'{self.path}') + '\n')
                f.flush()
                os.fsync(f.fileno())


def check_resume(outdir, config):
    """Refuse an output folder whose cells were computed with different result-changing settings."""
    path = os.path.join(outdir, 'sweep.json')
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f).get('fixed', {})
    except (OSError, ValueError, AttributeError) as e:
        raise SweepError(f'{path}: unreadable ({type(e).__name__}); use another --outdir') from None
    new = json.loads(json.dumps(config.fixed_settings()))
    for flag in LEGACY_FIXED:  # now an axis: the old value is the cells' interval (edm2.sweep.axes.cell_defaults)
        old.pop(flag, None)
    for flag in sorted(set(old) | set(new)):
        if old.get(flag) != new.get(flag):
            raise SweepError(f'{flag} differs from the sweep in {outdir} ({old.get(flag)} there, '
                             f'{new.get(flag)} now); use the same value or another --outdir')


def write_settings(outdir, config, best=None, extra=None):
    """sweep.json: the settings (`fixed` is what a resume must match) and, once done, the best cells."""
    doc = dict(fixed=config.fixed_settings(), net_std=config.net.stds, gnet_std=config.gnet.stds,
               guidance=config.guidances, rule=[str(r) for r in config.rules],
               interval=[interval_spec(i) for i in config.intervals], cell_defaults=config.cell_defaults,
               search=config.search, batch=config.batch,
               phema_batch=config.phema_batch, guide_batch=config.guide_batch,
               world_size=distributed.get_world_size(), best=best, **(extra or {}))
    if distributed.is_main():
        atomic_write_text(os.path.join(outdir, 'sweep.json'), jsontext.dumps(doc, indent=2) + '\n')
    return doc
