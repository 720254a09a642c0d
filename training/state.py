"""Training-state files of a run directory: checkpoints, the recorded settings, and choosing where to start.

A checkpoint `training-state-{kimg:07d}.pt` holds plain tensors and containers (loadable with
`torch.load(weights_only=True)`): network, Adam state, EMA state, RNG states, the image count, the
resolved settings and the image counts of the snapshots written so far. Every file is written under
a temporary name and renamed (`edm2.fileio`), so a killed run never leaves a torn file under a final
name. `training_options.json` records the settings for people and tools; the checkpoint's own copy
is what a resume is checked against.
"""

import json
import os
import re

import torch

from edm2.fileio import atomic_write, atomic_write_text
from edm2.safe_pickle import load_tensor_archive
from edm2 import jsontext
from .options import TrainingError, compare_settings

OPTIONS_FILE = 'training_options.json'
STATE_PATTERN = re.compile(r'^training-state-(\d+)\.pt$')
SNAPSHOT_PATTERN = re.compile(r'^network-snapshot-\d+-\d+\.\d+\.')
STATE_KEYS = ('cur_nimg', 'net', 'optimizer', 'ema', 'options')


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_state(outdir, cur_nimg, net, optimizer, ema, settings, snapshot_nimgs, device):
    """Write training-state-{kimg:07d}.pt durably (data and rename forced to disk); returns its path."""
    rng = {'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        rng['cuda'] = torch.cuda.get_rng_state(device)
    state = dict(
        format='edm2-training-state', version=2, cur_nimg=cur_nimg, step=cur_nimg // settings['batch'],
        options=jsontext.dumps(settings),
        net={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        optimizer=_to_cpu(optimizer.state_dict()),
        ema=_to_cpu(ema.state_dict()),
        rng=rng,
        # The data stream is a function of (seed, position): position = images consumed.
        data=dict(position=cur_nimg, seed=settings['seed']),
        snapshots=torch.tensor(sorted(snapshot_nimgs), dtype=torch.int64),
    )
    path = os.path.join(outdir, f'training-state-{cur_nimg // 1000:07d}.pt')
    with atomic_write(path, fsync=True) as f:
        writer = _KeepWriteError(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:  # e.g. a full disk: atomic_write names the file
                raise writer.error from None
            raise
    _fsync_dir(os.path.abspath(outdir))  # make the rename itself durable
    return path


class _KeepWriteError:
    """A file's `write` for torch.save, which turns an OSError of write() into a RuntimeError without its
    errno: the original error is kept here, so that a full disk is reported as one."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def list_checkpoints(outdir):
    """[(kimg, path)] of training-state files, newest first."""
    found = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = STATE_PATTERN.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(outdir, name)))
    return sorted(found, reverse=True)


def load_state(path):
    """The state dict of a training-state file (safe loading); raises on a damaged file."""
    state = load_tensor_archive(path)
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f'missing {missing[0]!r}')
    return state


def _newest_state(outdir, log):
    """(path, state) of the newest checkpoint that loads, or (None, None); damaged files are reported."""
    for _kimg, path in list_checkpoints(outdir):
        try:
            return path, load_state(path)
        except Exception as e:  # a torn or damaged file (any unpickling error): fall back to the previous one
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            log(f'Skipping unreadable checkpoint {path}: {text}')
    return None, None


def _recorded_settings(outdir):
    """(settings, note): the contents of training_options.json, or None and why it is not usable."""
    path = os.path.join(outdir, OPTIONS_FILE)
    if not os.path.exists(path):
        return None, f'{path} is missing'
    try:
        with open(path, encoding='utf-8') as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError('not a JSON object')
        return recorded, None
    except (OSError, ValueError) as e:
        return None, f'{path} is unreadable ({str(e).splitlines()[0]})'


def choose_start(outdir, new_settings, log):
    """Decide how the run in `outdir` starts: returns (path, state) of the checkpoint to resume, or
    (None, None) to start from the beginning, and says which in the log.

    The newest loadable checkpoint decides: its settings must equal `new_settings`. Without one, the
    run starts afresh; training_options.json from an earlier start that never wrote a checkpoint only
    blocks a restart with other settings when that start left snapshots (they would be mixed up).
    """
    path, state = _newest_state(outdir, log)
    recorded, note = _recorded_settings(outdir)
    if state is not None:
        diff = compare_settings(json.loads(state['options']), new_settings)
        _check(not diff, f'{path} was written with different settings ({diff}); use a new --outdir or the '
               f'original settings')
        if note:
            log(f'{note}: resuming from {path}, whose settings match this command (the file is rewritten)')
        return path, state
    snapshots = sorted(name for name in os.listdir(outdir) if SNAPSHOT_PATTERN.match(name)) \
        if os.path.isdir(outdir) else []
    if recorded is not None:
        diff = compare_settings(recorded, new_settings)
        _check(not (diff and snapshots), f'--outdir {outdir} holds snapshots of a run with different settings '
               f'({diff}) and no checkpoint to resume; use a new --outdir or the original settings')
        if diff:
            log(f'Starting from the beginning: {outdir} holds no checkpoint, only {OPTIONS_FILE} of an earlier '
                f'start with other settings ({diff}); it is replaced')
        else:
            log(f'Starting from the beginning: {outdir} holds no checkpoint of the earlier start with these settings')
    elif snapshots:
        log(f'Starting from the beginning: {note} and there is no checkpoint; {len(snapshots)} snapshot '
            f'file(s) already there are overwritten where names coincide')
    return None, None


def _check(cond, message):
    if not cond:
        raise TrainingError(message)


def record_settings(outdir, new_settings):
    """Write training_options.json (after the run's first successful step) unless it already says this."""
    path = os.path.join(outdir, OPTIONS_FILE)
    recorded, _note = _recorded_settings(outdir)
    if recorded is not None and not compare_settings(recorded, new_settings):
        return
    atomic_write_text(path, jsontext.dumps(new_settings, indent=2))


def restore(state, net, optimizer, ema, device):
    """Load a checkpoint into the network, optimiser, EMA tracker (rank 0 only; None elsewhere) and
    the RNGs; returns (image count, image counts of the snapshots written so far)."""
    net.load_state_dict(state['net'])
    optimizer.load_state_dict(state['optimizer'])
    if ema is not None:
        ema.load_state_dict(state['ema'])
    rng = state.get('rng', {})
    if 'torch' in rng:
        torch.set_rng_state(rng['torch'])
    if device.type == 'cuda' and rng.get('cuda') is not None:
        torch.cuda.set_rng_state(rng['cuda'], device)
    snapshots = state.get('snapshots')
    return int(state['cur_nimg']), ([] if snapshots is None else [int(t) for t in snapshots])


def truncate_stats(path, nimg):
    """Drop stats lines written after the checkpoint being resumed (they will be produced again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)['nimg'] <= nimg:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write_text(path, ''.join(keep))
