"""Power-function EMA (EDM2 paper, section 3 and appendix C; SPEC section 4).

An EMA profile with exponent gamma averages the weights theta(tau) with density proportional to
tau**gamma on [0, t]. Its relative standard deviation sigma_rel is a function of gamma alone.

    exp_to_std, std_to_exp, power_function_beta    sigma_rel <-> gamma, the tracking decay
    PowerFunctionEMA(net, stds)                    tracker used during training
    profile_inner, solve_coefficients, fit_error   post-hoc solver (float64) and its error bound
    find_snapshots, reconstruct, reconstruct_batches
                                                   streaming reconstruction of networks in memory
"""

import sys

import numpy as np

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0 limit: the uniform average over [0, t]


def exp_to_std(gamma):
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))."""
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def std_to_exp(std):
    """gamma = the largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0, s = sigma_rel."""
    std = float(std)
    if not 0 < std < SIGMA_REL_MAX:
        raise ValueError(f'EMA length sigma_rel={std} outside (0, {SIGMA_REL_MAX:.4f})')
    inv = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-6 * np.maximum(1, np.abs(roots))].real.max())


def power_function_beta(std, t_next, t_delta):
    """EMA decay for the step that brings the image count to t_next: beta = (1 - dt/t)^(gamma+1)."""
    gamma = std_to_exp(std)
    return float((1 - t_delta / t_next) ** (gamma + 1))


# ----------------------------------------------------------------------------------------------------
# Tracking during training (SPEC section 4): one EMA copy of the network per sigma_rel.

class PowerFunctionEMA:
    """Power-function EMA of a network's parameters at several relative lengths sigma_rel.

    Usage in a training loop (after the optimiser step that brought the image count to cur_nimg):
        ema = PowerFunctionEMA(net, stds=(0.050, 0.100))
        ...
        ema.update(cur_nimg=cur_nimg, batch_size=batch_size)
        for ema_net, std in ema.get(): save_network(..., ema_net, ema_std=std)

    Only parameters are averaged; buffers (e.g. the fixed Fourier features) are copied from the net.
    The EMA copies live on the net's device in the net's dtype and never require gradients.
    """

    def __init__(self, net, stds=(0.050, 0.100)):
        import copy
        self.net = net
        self.stds = tuple(float(std) for std in stds)
        for std in self.stds:
            std_to_exp(std)  # validates 0 < std < SIGMA_REL_MAX with a one-line ValueError
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _std in self.stds]

    def _pairs(self, ema):
        return zip(self.net.parameters(), ema.parameters())

    def reset(self):
        """Make every EMA copy equal to the current network weights."""
        import torch
        with torch.no_grad():
            for ema in self.emas:
                for p_net, p_ema in self._pairs(ema):
                    p_ema.copy_(p_net.detach())
                self._copy_buffers(ema)

    def _copy_buffers(self, ema):
        for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
            b_ema.copy_(b_net.detach())

    def update(self, cur_nimg, batch_size):
        """Apply one tracking step: ema <- beta*ema + (1-beta)*theta, beta = (1 - dt/t)^(gamma+1),
        for the step of `batch_size` images that brought the count to `cur_nimg` (SPEC section 4).
        On the first step (cur_nimg == batch_size) beta = 0, so the EMA becomes the weights."""
        import torch
        if not cur_nimg > 0 or not 0 < batch_size <= cur_nimg:
            raise ValueError(f'EMA update needs 0 < batch_size <= cur_nimg, got batch_size={batch_size}, '
                             f'cur_nimg={cur_nimg}')
        with torch.no_grad():
            for ema, std in zip(self.emas, self.stds):
                beta = power_function_beta(std, cur_nimg, batch_size)
                src = [p.detach() for p in self.net.parameters()]
                dst = list(ema.parameters())
                if all(s.dtype == d.dtype and s.device == d.device for s, d in zip(src, dst)):
                    torch._foreach_lerp_(dst, src, 1 - beta)  # one fused launch per EMA on GPU
                else:
                    for s, d in zip(src, dst):
                        d.lerp_(s.to(d.dtype), 1 - beta)
                self._copy_buffers(ema)

    def get(self):
        """[(ema_net, std), ...] in the order of `stds`."""
        return list(zip(self.emas, self.stds))

    def state_dict(self):
        """Plain dict of floats, lists and tensors, loadable with torch.load(weights_only=True)."""
        return {'stds': list(self.stds), 'emas': [dict(ema.state_dict()) for ema in self.emas]}

    def load_state_dict(self, state):
        stds = tuple(float(std) for std in state['stds'])
        if len(stds) != len(self.stds) or any(abs(a - b) > 1e-9 for a, b in zip(stds, self.stds)):
            raise ValueError(f'EMA state has stds {list(stds)}, this tracker has {list(self.stds)}')
        for ema, sd in zip(self.emas, state['emas']):
            ema.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------
# Post-hoc reconstruction (EDM2 paper, section 3.3 and appendix C.3; SPEC section 4).

class PhemaError(ValueError):
    """A one-line, user-facing problem with the inputs or the requested outputs of a reconstruction."""


def kimg_to_nimg(kimg):
    """Images seen for a snapshot labelled `kimg`: training times are multiples of the batch (SPEC section 3),
    and the published trainer labels them images//1000, so readers round up to the 1024-image grid."""
    return ((int(kimg) * 1000 + 999) // 1024) * 1024


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<a, b> = integral of the product of two unit-mass power-function profiles (broadcasting, float64).

    Profile (t, gamma) has density (gamma+1) tau^gamma / t^(gamma+1) on [0, t]; integrating the product
    over [0, min(t_a, t_b)] gives (SPEC section 4)
    (gamma_a+1)(gamma_b+1) (t_a/t_b)^e / ((gamma_a+gamma_b+1) max(t_a, t_b)), e = gamma_b if t_a < t_b else -gamma_a.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    e = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** e / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(in_times, in_stds, out_times, out_stds):
    """Least-squares weights X [inputs, outputs] such that sum_i X_ij * profile_i ~ target profile j.

    For each target only the snapshots with t_i <= t_j take part (the rest get weight 0): A_ik = <i, k>,
    b_i = <i, target>, solve A x = b in float64, then normalise x to sum 1 (SPEC section 4). A is the Gram
    matrix of the stored profiles, symmetric positive definite when no profile repeats, so a direct
    solve is exact to rounding (a truncated least-squares solve would perturb tiny weights); a singular
    A falls back to the minimum-norm least-squares solution.
    """
    in_times = np.asarray(in_times, dtype=np.float64)
    in_gammas = np.array([std_to_exp(s) for s in in_stds], dtype=np.float64)
    out_times = np.asarray(out_times, dtype=np.float64)
    out_gammas = np.array([std_to_exp(s) for s in out_stds], dtype=np.float64)
    X = np.zeros([len(in_times), len(out_times)], dtype=np.float64)
    for t in np.unique(out_times):  # one Gram matrix per target time, all lengths at once
        rows, cols = np.flatnonzero(in_times <= t), np.flatnonzero(out_times == t)
        if len(rows) == 0:
            raise PhemaError(f'no snapshot at or before the target time {t:.0f} images')
        ti, gi = in_times[rows], in_gammas[rows]
        A = profile_inner(ti[:, None], gi[:, None], ti[None, :], gi[None, :])
        B = profile_inner(ti[:, None], gi[:, None], t, out_gammas[None, cols])
        try:
            x = np.linalg.solve(A, B)
            if not np.all(np.isfinite(x)):
                raise np.linalg.LinAlgError
        except np.linalg.LinAlgError:
            x = np.linalg.lstsq(A, B, rcond=None)[0]
        X[np.ix_(rows, cols)] = x / x.sum(axis=0, keepdims=True)
    return X


class Snapshot:
    """One stored EMA snapshot: `source` (a path, or anything the loader accepts), its training time in
    kimg and its sigma_rel. `nimg` defaults to the published rounding of kimg (kimg_to_nimg)."""

    def __init__(self, source, kimg, std, nimg=None):
        self.source = source
        self.kimg = int(kimg)
        self.std = float(std)
        self.nimg = kimg_to_nimg(kimg) if nimg is None else int(nimg)

    def __repr__(self):
        return f'Snapshot({str(self.source)!r}, kimg={self.kimg}, std={self.std:.3f})'


class Reconstruction:
    """One reconstructed network: `net` (same class as the inputs, float32, eval mode), the `encoder` and
    `metadata` of the first input, `kimg`, `nimg`, `std`, and `coefficients` ([(snapshot, weight)])."""

    def __init__(self, net, encoder, metadata, kimg, nimg, std, coefficients):
        self.net, self.encoder, self.metadata = net, encoder, metadata
        self.kimg, self.nimg, self.std, self.coefficients = kimg, nimg, std, coefficients

    def state_dict(self):
        return self.net.state_dict()


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that the resident size tracks the
    networks actually alive: without it, tensors of a few MB freed between batches stay resident as
    fragmented heap and peak RSS creeps above (batch + 2) networks. A no-op where unavailable."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        try:
            import ctypes
            import ctypes.util
            if sys.platform.startswith('linux'):
                _malloc_trim = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
        except (OSError, AttributeError):
            pass
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _default_loader(source, device):
    from edm2.checkpoint import load_snapshot
    net, encoder, metadata = load_snapshot(source, device=device)
    return net, encoder, metadata


def plan_reconstruction(snapshots, out_stds, out_kimg=None):
    """Validate a request and solve it: returns (kimg, nimg, inputs, X) where `inputs` are the snapshots
    that take part (time <= target, sorted by time then std) and X [len(inputs), len(out_stds)] float64."""
    snapshots = list(snapshots)
    if not snapshots:
        raise PhemaError('no input snapshots')
    out_stds = [float(s) for s in out_stds]
    if not out_stds:
        raise PhemaError('no output EMA lengths requested')
    for std in out_stds + [s.std for s in snapshots]:
        if not 0 < std < SIGMA_REL_MAX:
            raise PhemaError(f'EMA length {std} outside (0, {SIGMA_REL_MAX:.4f})')
    kimgs = sorted({s.kimg for s in snapshots})
    if out_kimg is None:
        out_kimg = kimgs[-1]
    elif int(out_kimg) not in kimgs:
        raise PhemaError(f'--outkimg {out_kimg} is not the time of any input snapshot (have kimg {kimgs})')
    out_kimg = int(out_kimg)
    nimg = max(s.nimg for s in snapshots if s.kimg == out_kimg)
    inputs = sorted((s for s in snapshots if s.nimg <= nimg), key=lambda s: (s.nimg, s.std))
    seen = {}
    for s in inputs:  # a repeated profile makes the Gram matrix singular and means the same file twice
        key = (s.nimg, round(s.std, 6))
        if key in seen:
            raise PhemaError(f'two snapshots with kimg {s.kimg} and EMA length {s.std:.3f}: '
                             f'{seen[key].source} and {s.source}')
        seen[key] = s
    X = solve_coefficients([s.nimg for s in inputs], [s.std for s in inputs], [nimg] * len(out_stds), out_stds)
    return out_kimg, nimg, inputs, X


def _check_metadata(snap, metadata):
    """The planned time and length must be what the loaded file says it is."""
    kimg, std = (metadata or {}).get('kimg'), (metadata or {}).get('ema_std')
    if kimg is not None and int(kimg) != snap.kimg or std is not None and abs(float(std) - snap.std) > 5e-4:
        raise PhemaError(f'{snap.source}: file says kimg {kimg}, EMA length {std}; expected kimg {snap.kimg}, '
                         f'EMA length {snap.std:.3f}')


def _shapes(net):
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def _check_same_shapes(ref, ref_source, net, source):
    cur = _shapes(net)
    if ref != cur:
        diff = sorted(set(ref) ^ set(cur))
        what = f'tensor {diff[0]} present in only one' if diff else next(
            f'{k} has shape {list(cur[k])} vs {list(ref[k])}' for k in ref if ref[k] != cur[k])
        raise PhemaError(f'{source}: network does not match {ref_source} ({what})')


def _start_sum(net, weight):
    """An output network from the first input: its buffers are kept, its parameters scaled by the weight."""
    import copy

    import torch
    out = copy.deepcopy(net).float().eval().requires_grad_(False)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(weight)
    return out


def _add_to_sums(outs, net, weights):
    """outs[j] += weights[j] * net, parameter by parameter (helper so that no tensor outlives the call)."""
    import torch
    with torch.no_grad():
        src = [p.detach().to(torch.float32) for p in net.parameters()]
        for out, weight in zip(outs, weights):
            for p_out, p_in in zip(out.parameters(), src):
                # Multiply, then add: two float32 roundings per term, the same arithmetic as the
                # published tool (bitwise equal on its fixture).
                p_out.add_(p_in * weight)


def _is_native(source):
    import os
    return isinstance(source, (str, os.PathLike)) and str(source).endswith('.safetensors') and os.path.isfile(source)


def _add_native_to_sums(outs, source, weights, ref_shapes, ref_source, snap, device):
    """outs[j] += weights[j] * (the parameters stored in native file `source`), reading one tensor at a
    time (safetensors maps the file) instead of building the input network: only `batch` outputs and
    one tensor are in memory. The file is checked as edm2.checkpoint would: edm2 header, same tensors."""
    import json

    import torch
    from safetensors import safe_open
    try:
        with safe_open(str(source), framework='pt', device='cpu') as f:
            doc = json.loads((f.metadata() or {}).get('edm2', 'null'))
            if not isinstance(doc, dict) or doc.get('format') != 'edm2-network':
                raise PhemaError(f'{source}: not an edm2 network checkpoint')
            _check_metadata(snap, doc)
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            if shapes != ref_shapes:
                diff = sorted(set(ref_shapes) ^ set(shapes))
                what = f'tensor {diff[0]} present in only one' if diff else next(
                    f'{k} has shape {list(shapes[k])} vs {list(ref_shapes[k])}' for k in ref_shapes
                    if ref_shapes[k] != shapes[k])
                raise PhemaError(f'{source}: network does not match {ref_source} ({what})')
            params = [dict(out.named_parameters()) for out in outs]
            with torch.no_grad():
                for name in params[0]:
                    p_in = f.get_tensor(name).to(device=device, dtype=torch.float32)
                    for out_params, weight in zip(params, weights):
                        out_params[name].add_(p_in * weight)  # multiply, then add (see _add_to_sums)
    except PhemaError:
        raise
    except Exception as e:  # noqa: BLE001 -- SafetensorError, JSON errors, OSError: one line naming the file
        raise PhemaError(f'{source}: unreadable native checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})') from None


def reconstruct_batches(snapshots, out_stds, out_kimg=None, batch=8, device='cpu', loader=None,
                        progress=False):
    """Stream post-hoc EMA reconstructions, `batch` outputs at a time: yields one list of Reconstruction
    per batch of `out_stds` (in order). Every input taking part is read once per batch, and at most
    `batch` output networks plus one input network are held at a time. Parameters are the float32 sums
    sum_i X_ij theta_i; buffers come unchanged from the earliest input (SPEC section 4).

    `loader(source, device) -> (net, encoder, metadata)` defaults to edm2.checkpoint.load_snapshot; with
    the default, native files after a batch's first input are read one tensor at a time instead, so the
    input side needs one tensor rather than a whole network.
    Raises PhemaError for bad requests and inputs whose networks differ in shape; all inputs are read
    (and checked) within the first batch, before anything is yielded.
    """
    from tqdm import tqdm

    stream_native = loader is None  # the default loader: native files after the first are streamed
    loader = loader or _default_loader
    out_kimg, nimg, inputs, X = plan_reconstruction(snapshots, out_stds, out_kimg)
    out_stds = [float(s) for s in out_stds]
    batch = max(int(batch), 1)
    starts = range(0, len(out_stds), batch)
    bar = tqdm(total=len(starts) * len(inputs), unit='snapshot', desc='Reconstructing', disable=not progress)
    try:
        for start in starts:
            cols = list(range(start, min(start + batch, len(out_stds))))
            outs, first = [], None
            for i, snap in enumerate(inputs):
                if first is not None and stream_native and _is_native(snap.source):
                    _add_native_to_sums(outs, snap.source, [float(X[i, j]) for j in cols], ref_shapes,
                                        ref_source, snap, device)
                    _release_freed_memory()
                    bar.update(1)
                    continue
                net, encoder, metadata = loader(snap.source, device)
                _check_metadata(snap, metadata)
                if first is None:
                    first = (snap.source, encoder, metadata)
                    outs = [_start_sum(net, float(X[i, j])) for j in cols]
                    ref_shapes, ref_source = _shapes(net), snap.source  # shapes only: no network kept
                else:
                    _check_same_shapes(ref_shapes, ref_source, net, snap.source)
                    _add_to_sums(outs, net, [float(X[i, j]) for j in cols])
                del net, encoder, metadata  # drop this input before the next one is read
                _release_freed_memory()
                bar.update(1)
            yield [Reconstruction(out, first[1], first[2], out_kimg, nimg, out_stds[j],
                                  [(snap, float(X[i, j])) for i, snap in enumerate(inputs)])
                   for j, out in zip(cols, outs)]
            del outs
            _release_freed_memory()
    finally:
        bar.close()


def reconstruct(snapshots, out_stds, out_kimg=None, batch=8, device='cpu', loader=None, progress=False):
    """Like reconstruct_batches but yields the Reconstruction objects one by one (library API for sweeps):

        snaps = edm2.phema.find_snapshots('training-runs/00000')
        for r in edm2.phema.reconstruct(snaps, [0.05, 0.10, 0.15]):
            evaluate(r.net, r.std)
    """
    for outs in reconstruct_batches(snapshots, out_stds, out_kimg, batch, device, loader, progress):
        while outs:
            yield outs.pop(0)  # the caller's reference is the last one; freed when it moves on


_SNAPSHOT_NAME = r'^(?P<prefix>.*)-(?P<kimg>\d+)-(?P<std>\d+\.\d+)(?P<ext>\.[A-Za-z0-9_.]+)$'


def parse_snapshot_name(name):
    """'network-snapshot-0000049-0.100.pkl' -> ('network-snapshot', 49, 0.1, '.pkl'), or None."""
    import re
    m = re.match(_SNAPSHOT_NAME, name)
    if m is None:
        return None
    return m['prefix'], int(m['kimg']), float(m['std']), m['ext']


def snapshot_extensions():
    """File extensions recognised as snapshots: published pickles and the native checkpoint format."""
    exts = {'.pkl'}
    try:
        from edm2 import checkpoint
        for name in ('NATIVE_SUFFIX', 'NATIVE_EXTENSION', 'SUFFIX', 'EXTENSION'):
            if isinstance(getattr(checkpoint, name, None), str):
                exts.add(getattr(checkpoint, name))
    except ImportError:
        pass
    exts.add('.safetensors')
    return exts


def _native_header(path):
    """(kimg, std, nimg) from a native checkpoint's JSON header without reading its tensors, or None."""
    import json
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework='pt', device='cpu') as f:
            doc = json.loads((f.metadata() or {}).get('edm2', 'null'))
    except Exception:  # noqa: BLE001 -- unreadable here means: fall back to the file name
        return None
    if not isinstance(doc, dict):
        return None
    if 'phema' in (doc.get('metadata') or {}):
        return 'reconstruction'
    if doc.get('kimg') is None or doc.get('ema_std') is None:
        return None
    nimg = (doc.get('metadata') or {}).get('nimg')
    kimg = int(doc['kimg'])
    nimg = int(nimg) if isinstance(nimg, (int, float)) and int(nimg) // 1000 == kimg else None
    return kimg, float(doc['ema_std']), nimg


def find_snapshots(indir, inprefix=None, instd=None):
    """The snapshots in folder `indir` (not recursive), sorted by name: published pickles named
    `{prefix}-{kimg:07d}-{std:.3f}.pkl` and native `.safetensors` files, whose header gives kimg, sigma_rel
    and the exact image count (else the name does). Optionally only names starting with `inprefix` and
    sigma_rel in the list `instd`. Earlier reconstructions (native files recording `phema` provenance)
    and hidden files are left out, so --outdir may equal --indir."""
    import os
    exts = snapshot_extensions()
    found = []
    for name in sorted(os.listdir(indir)):
        path = os.path.join(indir, name)
        ext = os.path.splitext(name)[1]
        if ext not in exts or name.startswith('.') or not os.path.isfile(path):
            continue  # hidden names: temporaries of interrupted writes
        if inprefix is not None and not name.startswith(inprefix):
            continue
        parsed = parse_snapshot_name(name)
        info = _native_header(path) if ext != '.pkl' else None
        if info == 'reconstruction':
            continue  # an output of this module: a mix of snapshots, not a tracked power-function EMA
        if info is None:
            if parsed is None:
                continue
            info = parsed[1], parsed[2], None
        kimg, std, nimg = info
        if instd is not None and not any(abs(std - float(s)) < 5e-4 for s in instd):
            continue
        found.append(Snapshot(path, kimg, std, nimg=nimg))
    return found


def fit_error(in_times, in_stds, weights, out_time, out_std):
    """rho = sqrt(t * <r, r>) for the residual profile r = sum_i w_i p_i - p_target (float64, closed form).

    Tracking with beta = (1 - dt/t)^(gamma+1) averages the piecewise-constant weight trajectory exactly
    with the continuous profile (the betas telescope to (t_k/t)^(gamma+1)), and sum(w) = 1 makes r
    integrate to 0, so by Cauchy-Schwarz every coordinate of (reconstruction - true EMA) is bounded by
    rho * (the time-weighted standard deviation of that coordinate over [0, t]). rho is scale-free.
    """
    t = np.asarray(in_times, dtype=np.float64)
    g = np.array([std_to_exp(s) for s in in_stds], dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    g_out = std_to_exp(out_std)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, float(out_time), g_out)
    rr = w @ A @ w - 2 * w @ b + profile_inner(float(out_time), g_out, float(out_time), g_out)
    return float(np.sqrt(max(rr, 0.0) * out_time))
