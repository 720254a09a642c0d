"""Post-hoc EMA reconstruction in memory: networks of any EMA length summed from the snapshots saved
during training (EDM2 paper, Sec. 3.2), and the discovery of those snapshots in a folder.

The output weights are sum_i X_ij theta_i with X from `edm2.phema.solve_coefficients`; buffers come
unchanged from the earliest input. Outputs are produced `batch` at a time: every input taking part is
read once per batch, and at most `batch` outputs plus one input are in memory.

    snaps = find_snapshots('training-runs/00000-edm2-img512-xs')
    reads = collections.Counter()
    for rec in reconstruct(snaps, [0.05, 0.10, 0.15], batch=2, reads=reads):
        evaluate(rec.net, rec.encoder, rec.std)    # rec.kimg, rec.nimg, rec.coefficients too
    sum(reads.values())                            # snapshot files read: inputs x ceil(3 / 2)
"""

import copy
import ctypes
import ctypes.util
import dataclasses
import os
import sys

import torch
from tqdm import tqdm

from edm2 import checkpoint
from edm2.phema import SIGMA_REL_MAX, PhemaError, kimg_to_nimg, solve_coefficients

__all__ = ['Snapshot', 'Reconstruction', 'find_snapshots', 'plan_reconstruction', 'reconstruct',
           'reconstruct_batches']


@dataclasses.dataclass(eq=False)
class Snapshot:
    """One stored EMA snapshot: `source` (a path, or anything the loader accepts), its training time in
    kimg, its sigma_rel, and its exact image count `nimg` (default: kimg_to_nimg(kimg))."""
    source: object
    kimg: int
    std: float
    nimg: int = None

    def __post_init__(self):
        self.kimg, self.std = int(self.kimg), float(self.std)
        self.nimg = kimg_to_nimg(self.kimg) if self.nimg is None else int(self.nimg)


@dataclasses.dataclass(eq=False)
class Reconstruction:
    """One reconstructed network."""
    std: float            # its EMA length sigma_rel
    net: torch.nn.Module  # same class as the inputs, float32, eval mode, no gradients
    encoder: object       # the first input's encoder
    metadata: dict        # the first input's metadata
    kimg: int             # training time, as labelled
    nimg: int             # training time in images
    coefficients: list    # [(Snapshot, weight)] over the inputs taking part


# ----------------------------------------------------------------------------------------------------
# Finding snapshots.

def _native_time(path, parsed):
    """(kimg, std, nimg) from a native file's header; 'reconstruction' for earlier outputs of this
    module; None when the header lacks the time (then the name decides) or the file is not ours."""
    try:
        header = checkpoint.read_header(path)
    except checkpoint.CheckpointError as e:
        if parsed is None:
            return None  # a foreign .safetensors file with another name: not an input
        raise PhemaError(str(e)) from None
    metadata = header.get('metadata') or {}
    if 'phema' in metadata:
        return 'reconstruction'  # a mix of snapshots, not a tracked power-function EMA
    kimg, std, nimg = header['kimg'], header['ema_std'], metadata.get('nimg')
    if kimg is None or std is None:
        return None
    return kimg, std, (nimg if nimg is not None and nimg // 1000 == kimg else None)


def find_snapshots(indir, inprefix=None, instd=None):
    """The snapshots in folder `indir` (not recursive), sorted by name: published pickles named
    `{prefix}-{kimg:07d}-{std:.3f}.pkl` and native files, whose header gives kimg, sigma_rel and the exact
    image count (else their name does). Optionally only names starting with `inprefix` and sigma_rel in
    the list `instd`. Earlier reconstructions (native files recording `phema` provenance) and hidden
    files (temporaries) are left out, so outputs may go to `indir`. A file named like a snapshot whose
    header is unreadable raises PhemaError naming it."""
    found = []
    for name in sorted(os.listdir(indir)):
        path = os.path.join(indir, name)
        if name.startswith('.') or not os.path.isfile(path) or (inprefix is not None and not name.startswith(inprefix)):
            continue
        parsed = checkpoint.parse_snapshot_name(name)
        time = _native_time(path, parsed) if name.endswith(checkpoint.NATIVE_SUFFIX) else None
        if time == 'reconstruction' or (time is None and parsed is None):
            continue
        kimg, std, nimg = time if time is not None else (parsed.kimg, parsed.std, None)
        if instd is None or any(abs(std - float(s)) < 5e-4 for s in instd):
            found.append(Snapshot(path, kimg, std, nimg=nimg))
    return found


# ----------------------------------------------------------------------------------------------------
# Planning: which inputs take part, with which weights.

def plan_reconstruction(snapshots, stds, kimg=None):
    """Validate a request and solve it: returns (kimg, nimg, inputs, X) where `inputs` are the snapshots
    that take part (time <= target, sorted by time then std) and X [len(inputs), len(stds)] float64.
    The target time `kimg` (default: the latest) must be the time of an input."""
    snapshots = list(snapshots)
    if not snapshots:
        raise PhemaError('no input snapshots')
    stds = [float(s) for s in stds]
    if not stds:
        raise PhemaError('no output EMA lengths requested')
    for std in stds + [s.std for s in snapshots]:
        if not 0 < std < SIGMA_REL_MAX:
            raise PhemaError(f'EMA length {std} outside (0, {SIGMA_REL_MAX:.4f})')
    kimgs = sorted({s.kimg for s in snapshots})
    if kimg is None:
        kimg = kimgs[-1]
    elif int(kimg) not in kimgs:
        raise PhemaError(f'--outkimg {kimg} is not the time of any input snapshot (have kimg {kimgs})')
    kimg = int(kimg)
    nimg = max(s.nimg for s in snapshots if s.kimg == kimg)
    inputs = sorted((s for s in snapshots if s.nimg <= nimg), key=lambda s: (s.nimg, s.std))
    seen = {}
    for s in inputs:  # a repeated profile makes the Gram matrix singular and means the same file twice
        key = (s.nimg, round(s.std, 6))
        if key in seen:
            raise PhemaError(f'two snapshots with kimg {s.kimg} and EMA length {s.std:.3f}: '
                             f'{seen[key].source} and {s.source}')
        seen[key] = s
    X = solve_coefficients([s.nimg for s in inputs], [s.std for s in inputs], [nimg] * len(stds), stds)
    return kimg, nimg, inputs, X


# ----------------------------------------------------------------------------------------------------
# Summing.

_malloc_trim = None


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that the resident size tracks the
    networks actually alive: without it, tensors of a few MB freed between batches stay resident as
    fragmented heap and peak RSS creeps above (batch + 2) networks. A no-op where unavailable."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith('linux'):
            try:
                _malloc_trim = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
            except (OSError, AttributeError):
                pass
    if _malloc_trim:
        _malloc_trim(0)


def _check_time(snap, kimg, std):
    """The planned time and length must be what the file itself says."""
    if kimg is not None and int(kimg) != snap.kimg or std is not None and abs(float(std) - snap.std) > 5e-4:
        raise PhemaError(f'{snap.source}: file says kimg {kimg}, EMA length {std}; expected kimg {snap.kimg}, '
                         f'EMA length {snap.std:.3f}')


def _check_shapes(ref_shapes, ref_source, shapes, source):
    if shapes != ref_shapes:
        diff = sorted(set(ref_shapes) ^ set(shapes))
        what = f'tensor {diff[0]} present in only one' if diff else next(
            f'{k} has shape {list(shapes[k])} vs {list(ref_shapes[k])}'
            for k in ref_shapes if ref_shapes[k] != shapes[k])
        raise PhemaError(f'{source}: network does not match {ref_source} ({what})')


def _shapes(net):
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def _start_sums(net, weights):
    """Output networks from the first input: its buffers are kept, its parameters scaled by each weight."""
    outs = []
    for weight in weights:
        out = copy.deepcopy(net).float().eval().requires_grad_(False)
        with torch.no_grad():
            for p in out.parameters():
                p.mul_(weight)
        outs.append(out)
    return outs


def _add_to_sums(outs, weights, named_tensors):
    """outs[j] += weights[j] * tensor, for each (parameter name, tensor) of one input, one at a time."""
    params = [dict(out.named_parameters()) for out in outs]
    with torch.no_grad():
        for name, tensor in named_tensors:
            tensor = tensor.to(dtype=torch.float32)
            for out_params, weight in zip(params, weights):
                # Multiply, then add: two float32 roundings per term, the same arithmetic as the
                # published tool (bitwise equal on its fixture).
                out_params[name].add_(tensor * weight)


def _add_native(outs, weights, snap, ref_shapes, ref_source, device):
    """Add a native input read one tensor at a time (the file is memory-mapped), not as a network."""
    with checkpoint.NativeFile(snap.source) as f:
        _check_time(snap, f.header['kimg'], f.header['ema_std'])
        _check_shapes(ref_shapes, ref_source, f.shapes, snap.source)
        params = [name for name, _ in outs[0].named_parameters()]
        _add_to_sums(outs, weights, ((name, f.tensor(name).to(device)) for name in params))


def _load(snap, loader, device):
    net, encoder, metadata = loader(snap.source, device)
    _check_time(snap, (metadata or {}).get('kimg'), (metadata or {}).get('ema_std'))
    return net, encoder, metadata


def _default_loader(source, device):
    return checkpoint.load_snapshot(source, device=device)


def _sum_batch(inputs, X, cols, loader, stream_native, device, reads, bar):
    """The outputs of columns `cols` of X, and the first input's (encoder, metadata)."""
    outs, first, ref_shapes = [], None, None
    for i, snap in enumerate(inputs):
        weights = [float(X[i, j]) for j in cols]
        if reads is not None:
            reads[snap.source] += 1
        if first is not None and stream_native and str(snap.source).endswith(checkpoint.NATIVE_SUFFIX):
            _add_native(outs, weights, snap, ref_shapes, first[0], device)
        else:
            net, encoder, metadata = _load(snap, loader, device)
            if first is None:
                first = (snap.source, encoder, metadata)
                outs = _start_sums(net, weights)
                ref_shapes = _shapes(net)  # shapes only: no input network is kept
            else:
                _check_shapes(ref_shapes, first[0], _shapes(net), snap.source)
                _add_to_sums(outs, weights, ((n, p.detach()) for n, p in net.named_parameters()))
            del net, encoder, metadata  # drop this input before the next one is read
        _release_freed_memory()
        bar.update(1)
    return outs, first[1], first[2]


def reconstruct_batches(snapshots, stds, kimg=None, *, batch=8, device='cpu', loader=None, reads=None,
                        progress=False):
    """Yield lists of Reconstruction, `batch` outputs at a time, in the order of `stds`.

    snapshots  Snapshot list (e.g. from find_snapshots); those after the target time are ignored.
    stds       output EMA lengths sigma_rel, each in (0, 0.2887).
    kimg       output training time; must be the time of an input; default: the latest.
    batch      outputs summed per pass over the inputs (memory: batch outputs + one input).
    device     where the sums are made.
    loader     loader(source, device) -> (net, encoder, metadata); default edm2.checkpoint.load_snapshot,
               in which case native inputs after a batch's first are read one tensor at a time.
    reads      a collections.Counter, or None: reads[source] += 1 for every input read.
    progress   show a tqdm bar.

    Raises PhemaError (bad request, inputs whose time or shapes disagree) or CheckpointError (an
    unreadable input); every input is read, and so checked, within the first batch.
    """
    stream_native = loader is None
    loader = loader or _default_loader
    kimg, nimg, inputs, X = plan_reconstruction(snapshots, stds, kimg)
    stds = [float(s) for s in stds]
    batch = max(int(batch), 1)
    starts = range(0, len(stds), batch)
    with tqdm(total=len(starts) * len(inputs), unit='snapshot', desc='Reconstructing', disable=not progress) as bar:
        for start in starts:
            cols = list(range(start, min(start + batch, len(stds))))
            outs, encoder, metadata = _sum_batch(inputs, X, cols, loader, stream_native, device, reads, bar)
            yield [Reconstruction(stds[j], out, encoder, metadata, kimg, nimg,
                                  [(snap, float(X[i, j])) for i, snap in enumerate(inputs)])
                   for j, out in zip(cols, outs)]
            del outs
            _release_freed_memory()


def reconstruct(snapshots, stds, kimg=None, *, batch=8, device='cpu', loader=None, reads=None, progress=False):
    """Like reconstruct_batches, but yields the Reconstruction objects one by one. The generator keeps no
    reference to an output it has yielded, so a caller that drops it frees it."""
    for outs in reconstruct_batches(snapshots, stds, kimg, batch=batch, device=device, loader=loader,
                                    reads=reads, progress=progress):
        while outs:
            yield outs.pop(0)
