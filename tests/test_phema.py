"""Power-function EMA: tracking, the post-hoc solver, streaming reconstruction, reconstruct_phema.py."""

import io
import pathlib

import numpy as np
import pytest
import torch

from edm2 import checkpoint, phema, phema_reconstruct


# ----------------------------------------------------------------------------------------------------
# Scalars (the official fixture).

def test_scalars_match_official(official):
    ref = torch.load(official('phema-scalars.pt'), weights_only=False)
    for std, gamma in zip(ref['stds'].tolist(), ref['exps'].tolist()):
        assert phema.std_to_exp(std) == pytest.approx(gamma, rel=1e-12)
        assert phema.exp_to_std(gamma) == pytest.approx(std, rel=1e-12)
    assert phema.power_function_beta(0.100, 8192, 1024) == pytest.approx(ref['beta_std0100_t8192_dt1024'], rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Tracker.

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        self.register_buffer('counter', torch.zeros([]))


def test_tracker_matches_closed_form_weights():
    # With equal batches t_k = k*dt, beta_k = (1 - 1/k)^(g+1), so the product of betas after step k is
    # (k/n)^(g+1) and the EMA after n steps is sum_k theta_k (k^(g+1) - (k-1)^(g+1)) / n^(g+1).
    torch.manual_seed(0)
    net = _Toy().double()
    ema = phema.PowerFunctionEMA(net, stds=(0.05, 0.2))
    n, dt = 40, 64
    traj = []
    for k in range(1, n + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) + k / 10)
            net.counter.fill_(k)
        traj.append([p.detach().clone() for p in net.parameters()])
        ema.update(cur_nimg=k * dt, batch_size=dt)
    for ema_net, std in ema.get():
        g = phema.std_to_exp(std)
        k = np.arange(1, n + 1, dtype=np.float64)
        w = (k ** (g + 1) - (k - 1) ** (g + 1)) / n ** (g + 1)
        for i, p in enumerate(ema_net.parameters()):
            expected = sum(wk * traj[kk][i] for kk, wk in enumerate(w))
            torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)
            assert not p.requires_grad
        assert ema_net.counter.item() == n  # buffers are copied, not averaged


def test_tracker_reset_and_state_dict_roundtrip():
    torch.manual_seed(1)
    net = _Toy()
    ema = phema.PowerFunctionEMA(net)
    assert [std for _, std in ema.get()] == [0.05, 0.1]
    with torch.no_grad():
        net.lin.weight.add_(1)
    ema.update(cur_nimg=2048, batch_size=1024)  # beta = 0.5^(g+1): a strict mix, not the weights
    assert not torch.equal(ema.emas[0].lin.weight, net.lin.weight)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = phema.PowerFunctionEMA(_Toy())
    other.load_state_dict(state)
    for (a, _), (b, _) in zip(ema.get(), other.get()):
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(pa, pb)
    ema.reset()
    for e, _ in ema.get():
        assert torch.equal(e.lin.weight, net.lin.weight)
    with pytest.raises(ValueError, match='stds'):
        phema.PowerFunctionEMA(_Toy(), stds=(0.05,)).load_state_dict(state)
    with pytest.raises(ValueError):
        phema.PowerFunctionEMA(_Toy(), stds=(0.3,))


# ----------------------------------------------------------------------------------------------------
# Solver.

def test_profile_inner_matches_quadrature():
    # Independent check of the closed form: adaptive quadrature of the product of the two densities
    # over [0, min(t_a, t_b)] (both vanish beyond their own t).
    from scipy.integrate import quad

    def density(tau, t, g):
        return (g + 1) * tau ** g / t ** (g + 1)
    for ta, ga, tb, gb in [(1.0, 6.9, 3.0, 16.9), (3.0, 0.17, 2.0, 96.9), (2.5, 3.5, 2.5, 1.8)]:
        numeric = quad(lambda tau: density(tau, ta, ga) * density(tau, tb, gb), 0, min(ta, tb),
                       epsabs=0, epsrel=1e-12, limit=200)[0]
        assert phema.profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-10)
        assert phema.profile_inner(ta, ga, tb, gb) == pytest.approx(phema.profile_inner(tb, gb, ta, ga), rel=1e-14)


def _fixture_inputs(expected):
    parsed = [checkpoint.parse_snapshot_name(name) for name in expected['in_files']]
    return [phema.kimg_to_nimg(p[1]) for p in parsed], [p[2] for p in parsed]


def test_coefficients_match_official(official):
    expected = torch.load(official('phema-expected.pt'), weights_only=False)
    times, stds = _fixture_inputs(expected)
    assert phema.kimg_to_nimg(49) == 49152 and phema.kimg_to_nimg(8) == 8192
    X = phema.solve_coefficients(times, stds, [phema.kimg_to_nimg(expected['out_kimg'])] * 2, [0.070, 0.150])
    np.testing.assert_allclose(X, expected['coefficients'].numpy(), rtol=1e-9, atol=0)
    np.testing.assert_allclose(X.sum(0), 1, rtol=1e-14)


def test_coefficients_use_only_earlier_snapshots():
    times, stds = [1024, 1024, 2048, 2048, 3072, 3072], [0.05, 0.1] * 3
    X = phema.solve_coefficients(times, stds, [2048], [0.08])
    assert np.all(X[4:] == 0) and X[:4, 0].sum() == pytest.approx(1, rel=1e-14)
    # A target equal to a stored profile is reproduced exactly by that snapshot alone.
    X = phema.solve_coefficients(times, stds, [3072], [0.1])
    np.testing.assert_allclose(X[:, 0], [0, 0, 0, 0, 0, 1], atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# Streaming reconstruction against a simulated training trajectory (independent correctness).

class _Vec(torch.nn.Module):
    def __init__(self, dim, dtype=torch.float32):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.register_buffer('tag', torch.zeros([], dtype=dtype))


def test_reconstruction_matches_directly_computed_ema():
    """Track a random-walk trajectory at sigma_rel 0.05 and 0.10 with snapshots every 8 steps, reconstruct
    0.15 (and 0.07), and compare with the power-function EMA computed directly from the trajectory.

    Bound: tracking averages the piecewise-constant trajectory exactly with the continuous profile, so
    reconstruction - truth = integral r(tau) theta(tau) dtau with r = sum_i X_i p_i - p_target. As
    integral r = 0, Cauchy-Schwarz gives |error_d| <= rho * std_t(theta_d), rho = sqrt(t <r, r>)
    (phema.fit_error, closed form). Storing snapshots and summing in float32 adds at most
    (n_inputs + 1) * sum|X_i| * max|theta| * 2^-24.
    """
    torch.manual_seed(0)
    dim, steps, every, dt = 2000, 256, 8, 512
    net = _Vec(dim, torch.float64)
    tracker = phema.PowerFunctionEMA(net, stds=(0.05, 0.10))
    traj = torch.cumsum(torch.randn(steps, dim, dtype=torch.float64), 0) * 0.1 + torch.linspace(0, 3, steps)[:, None]
    store = {}
    for k in range(1, steps + 1):
        with torch.no_grad():
            net.theta.copy_(traj[k - 1])
        tracker.update(cur_nimg=k * dt, batch_size=dt)
        if k % every == 0:
            for ema_net, std in tracker.get():
                snap = _Vec(dim)
                snap.theta.data.copy_(ema_net.theta.data)  # stored in float32, like a snapshot file
                snap.tag.fill_(k)
                store[(k * dt, std)] = snap
    # Snapshot kimg labels are images//1000; pass the exact image counts like a native file would.
    snaps = [phema_reconstruct.Snapshot(key, kimg=key[0] // 1000, std=key[1], nimg=key[0]) for key in store]
    out_stds = [0.15, 0.07]
    loads = []

    def loader(source, device):
        loads.append(source)
        return store[source], None, {}

    recs = list(phema_reconstruct.reconstruct(snaps, out_stds, batch=1, loader=loader))
    assert len(loads) == 2 * len(snaps)  # every input read once per batch, batch=1 -> twice
    n = steps * dt
    for rec, std in zip(recs, out_stds):
        assert rec.std == std and rec.nimg == n and rec.kimg == n // 1000
        g = phema.std_to_exp(std)
        k = torch.arange(1, steps + 1, dtype=torch.float64)
        w = (k ** (g + 1) - (k - 1) ** (g + 1)) / steps ** (g + 1)  # discrete weights of the true EMA
        truth = (w[:, None] * traj).sum(0)
        X = np.array([c for _, c in rec.coefficients])
        rho = phema.fit_error([s.nimg for s, _ in rec.coefficients], [s.std for s, _ in rec.coefficients], X, n, std)
        assert rho < 0.01  # a priori: dense snapshots of two lengths fit a third one closely
        std_t = traj.std(0, unbiased=False)
        bound = rho * std_t + (len(X) + 1) * np.abs(X).sum() * traj.abs().max() * 2 ** -24
        err = (rec.net.theta.detach().double() - truth).abs()
        assert torch.all(err <= bound), float((err / bound).max())
        assert float((err / std_t).max()) < 0.01
        assert rec.net.tag.item() == every  # buffers from the earliest input, unchanged
    # Without reconstruction the nearest stored length is far off: the test can tell the difference.
    nearest = store[(n, 0.10)].theta.detach().double()
    g = phema.std_to_exp(0.15)
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    truth = (((k ** (g + 1) - (k - 1) ** (g + 1)) / steps ** (g + 1))[:, None] * traj).sum(0)
    assert float(((nearest - truth).abs() / traj.std(0, unbiased=False)).max()) > 0.05


def test_streaming_holds_at_most_batch_outputs_plus_one_input():
    import copy
    import weakref
    torch.manual_seed(0)
    store = {(k, std): _Vec(64) for k in (1024, 2048, 3072) for std in (0.05, 0.1)}
    for v in store.values():
        v.theta.data.normal_()
    snaps = [phema_reconstruct.Snapshot(key, kimg=1, std=key[1], nimg=key[0]) for key in store]
    live_inputs, live_outputs, alive = [], [], []

    def loader(source, device):
        # Alive when the next input is read: earlier inputs (must be none) and outputs of earlier
        # batches that the caller already dropped (must be none: the generator keeps no reference).
        alive.append((sum(r() is not None for r in live_inputs), sum(r() is not None for r in live_outputs)))
        net = copy.deepcopy(store[source])
        live_inputs.append(weakref.ref(net))
        return net, None, {}

    sizes = []
    for recs in phema_reconstruct.reconstruct_batches(snaps, [0.06, 0.07, 0.08, 0.09, 0.11], batch=2, loader=loader):
        sizes.append(len(recs))
        live_outputs.extend(weakref.ref(r.net) for r in recs)
        del recs
    assert sizes == [2, 2, 1]
    assert alive == [(0, 0)] * (3 * len(snaps))


# ----------------------------------------------------------------------------------------------------
# reconstruct_phema.py

def parse_float_list(text):
    from edm2.commands.cli import parse_number_list
    return parse_number_list(text, '--outstd')


def test_parse_float_list():
    values = parse_float_list('0.010,0.015,...,0.250')
    assert len(values) == 49 and values[0] == 0.010 and values[-1] == 0.250 and values[1] == 0.015
    assert values[20] == 0.110  # decimal arithmetic: no drift, so file names are exact
    assert parse_float_list('0.1, 0.05') == [0.1, 0.05]
    assert parse_float_list('0.05,0.10,...,0.2,0.25') == [0.05, 0.1, 0.15, 0.2, 0.25]
    import click
    for bad in ['0.1,...', '...,0.2', '0.1,0.2,...,0.25', '0.2,0.1,...,0.05', 'abc', '']:
        with pytest.raises(click.BadParameter):
            parse_float_list(bad)


def _run(args):
    from click.testing import CliRunner

    from edm2.commands import reconstruct_phema
    return CliRunner().invoke(reconstruct_phema.main, [str(a) for a in args])


def _state_dict(path):
    from edm2.checkpoint import load_snapshot
    return load_snapshot(path)[0].state_dict()


def _assert_matches(path, ref, coefficients, inputs, fp16):
    """Float32 sums: |ours - ref| <= 1e-6 * sum_i |X_i theta_i| (12 terms x 2^-24 rounding each stays below
    that); float16 storage adds at most one float16 ulp (2^-10 relative, 2^-24 absolute near 0)."""
    ours = _state_dict(path)
    assert set(ours) == set(ref)
    for name, expected in ref.items():
        scale = sum(abs(c) * inp[name].abs() for c, inp in zip(coefficients, inputs))
        tol = 1e-6 * scale + (2 ** -10 * expected.abs() + 2 ** -24 if fp16 else 0)
        assert torch.all((ours[name] - expected).abs() <= tol), name


def test_library_parity_with_official(official):
    """In memory, no files written: the streaming API on the published pickles gives the official sums."""
    from edm2.checkpoint import load_snapshot
    folder = official('phema-snapshots')
    expected = torch.load(official('phema-expected.pt'), weights_only=False)
    inputs = [load_snapshot(folder / name)[0].state_dict() for name in expected['in_files']]
    snaps = phema_reconstruct.find_snapshots(folder)
    assert [pathlib.Path(s.source).name for s in snaps] == expected['in_files']
    recs = list(phema_reconstruct.reconstruct(snaps, [0.070, 0.150], batch=1))
    for j, rec in enumerate(recs):
        np.testing.assert_allclose([c for _, c in rec.coefficients], expected['coefficients'][:, j], rtol=1e-9)
        ref = expected['state_dicts'][f'{rec.std:.3f}']
        ours = rec.net.state_dict()
        for name, value in ref.items():
            scale = sum(abs(c) * inp[name].abs() for c, inp in zip(expected['coefficients'][:, j].tolist(), inputs))
            assert torch.all((ours[name] - value).abs() <= 1e-6 * scale), name


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_cli_parity_with_official(official, tmp_path, dtype):
    from edm2.checkpoint import load_snapshot
    folder = official('phema-snapshots')
    expected = torch.load(official('phema-expected.pt'), weights_only=False)
    inputs = [load_snapshot(folder / name)[0].state_dict() for name in expected['in_files']]
    suffix = '_fp16' if dtype == 'float16' else ''
    res = _run(['--indir', folder, '--outdir', tmp_path, '--outstd', '0.070,0.150', '--dtype', dtype])
    assert res.exit_code == 0, res.output
    for j, std in enumerate(['0.070', '0.150']):
        _assert_matches(tmp_path / f'phema-0000049-{std}.safetensors', expected['state_dicts' + suffix][std],
                        expected['coefficients'][:, j].tolist(), inputs, dtype == 'float16')
    res = _run(['--indir', folder, '--outdir', tmp_path, '--outstd', '0.120', '--outkimg', 40, '--dtype', dtype,
                '--batch', 1])
    assert res.exit_code == 0, res.output
    times, stds = _fixture_inputs(expected)
    X = phema.solve_coefficients(times, stds, [phema.kimg_to_nimg(40)], [0.120])[:, 0]
    _assert_matches(tmp_path / 'phema-0000040-0.120.safetensors', expected['at_kimg40' + suffix]['0.120'],
                    X.tolist(), inputs, dtype == 'float16')
    meta = load_snapshot(tmp_path / 'phema-0000040-0.120.safetensors')[2]
    assert meta['kimg'] == 40 and meta['ema_std'] == 0.120 and meta['nimg'] == 40960
    first_input = load_snapshot(folder / expected['in_files'][0])[2]
    assert len(meta['phema']['inputs']) == 10 and meta['dataset_kwargs'] == first_input['dataset_kwargs']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['phema-0000040-0.120.safetensors',
                                                          'phema-0000049-0.070.safetensors',
                                                          'phema-0000049-0.150.safetensors']


@pytest.mark.slow
def test_cli_mixed_native_and_published_inputs_and_skip(official, tmp_path):
    from edm2.checkpoint import load_snapshot, save_network
    folder = official('phema-snapshots')
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    for i, src in enumerate(sorted(folder.iterdir())):
        if i % 2:
            net, encoder, meta = load_snapshot(src)
            save_network(mixed / src.name.replace('.pkl', '.safetensors'), net, encoder, dtype=torch.float16,
                         kimg=meta['kimg'], ema_std=meta['ema_std'])
        else:
            (mixed / src.name).symlink_to(src)
    ref_dir, out = tmp_path / 'ref', tmp_path / 'out'
    assert _run(['--indir', folder, '--outdir', ref_dir, '--outstd', '0.090']).exit_code == 0
    res = _run(['--indir', mixed, '--outdir', out, '--outstd', '0.090'])
    assert res.exit_code == 0, res.output
    a, b = _state_dict(ref_dir / 'phema-0000049-0.090.safetensors'), _state_dict(out / 'phema-0000049-0.090.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)  # fp16 -> native fp16 is lossless: same sums
    # --skip leaves an existing output alone and reconstructs only the missing one.
    target = out / 'phema-0000049-0.090.safetensors'
    target.write_bytes(b'sentinel')
    res = _run(['--indir', mixed, '--outdir', out, '--outstd', '0.090,0.110', '--skip'])
    assert res.exit_code == 0, res.output
    assert target.read_bytes() == b'sentinel' and (out / 'phema-0000049-0.110.safetensors').exists()
    # --inprefix / --instd filter the inputs: one EMA length alone still reconstructs itself exactly.
    res = _run(['--indir', mixed, '--outdir', out, '--outstd', '0.100', '--instd', '0.100', '--outprefix', 'only'])
    assert res.exit_code == 0, res.output
    assert 'std 0.050' not in res.output
    net = _state_dict(out / 'only-0000049-0.100.safetensors')
    direct = _state_dict(folder / 'network-snapshot-0000049-0.100.pkl')
    for k in net:
        torch.testing.assert_close(net[k], direct[k], rtol=1e-5, atol=1e-6)


def _one_line_error(res):
    assert res.exit_code in (1, 2), res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert 'Traceback' not in res.output and lines[-1].startswith('Error:'), res.output
    return lines[-1]


@pytest.mark.slow
def test_cli_bad_input(official, tmp_path):
    from edm2.checkpoint import load_snapshot, save_network
    from edm2.networks import Precond
    folder = official('phema-snapshots')
    out = tmp_path / 'out'
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'no snapshots' in _one_line_error(_run(['--indir', empty, '--outdir', out, '--outstd', '0.1']))
    assert 'no snapshots' in _one_line_error(_run(['--indir', folder, '--outdir', out, '--outstd', '0.1',
                                                   '--inprefix', 'nothing']))
    assert 'not a folder' in _one_line_error(_run(['--indir', tmp_path / 'missing', '--outdir', out, '--outstd', '0.1']))
    assert '--outkimg 41' in _one_line_error(_run(['--indir', folder, '--outdir', out, '--outstd', '0.1', '--outkimg', 41]))
    for std in ['0.3', '0', '-0.05', '0.2887']:
        assert 'must lie in' in _one_line_error(_run(['--indir', folder, '--outdir', out, '--outstd', std]))
    assert '--outstd' in _one_line_error(_run(['--indir', folder, '--outdir', out, '--outstd', '0.1,0.1001']))
    # Inconsistent shapes: the last snapshot replaced by a wider network -> error, nothing written.
    bad = tmp_path / 'bad'
    bad.mkdir()
    for src in sorted(folder.iterdir())[:-1]:
        (bad / src.name).symlink_to(src)
    net, encoder, _ = load_snapshot(folder / 'network-snapshot-0000049-0.100.pkl')
    wide = Precond(**dict(net.init_kwargs, model_channels=16))
    save_network(bad / 'network-snapshot-0000049-0.100.safetensors', wide, encoder, kimg=49, ema_std=0.1)
    msg = _one_line_error(_run(['--indir', bad, '--outdir', out, '--outstd', '0.07,0.08,0.09', '--batch', 2]))
    assert 'network-snapshot-0000049-0.100.safetensors' in msg and 'shape' in msg
    assert not out.exists()
    # The same snapshot twice (a pickle and its native copy): ambiguous, refused.
    dup = tmp_path / 'dup'
    dup.mkdir()
    for src in sorted(folder.iterdir()):
        (dup / src.name).symlink_to(src)
    save_network(dup / 'network-snapshot-0000049-0.100.safetensors', net, encoder, kimg=49, ema_std=0.1)
    msg = _one_line_error(_run(['--indir', dup, '--outdir', out, '--outstd', '0.07']))
    assert 'two snapshots with kimg 49' in msg and not out.exists()
    # A corrupt input: one line naming it, nothing written.
    (bad / 'network-snapshot-0000049-0.100.safetensors').write_bytes(b'\x00' * 64)
    msg = _one_line_error(_run(['--indir', bad, '--outdir', out, '--outstd', '0.07']))
    assert 'network-snapshot-0000049-0.100.safetensors' in msg
    assert not out.exists()


def test_find_snapshots_reads_native_headers(official, tmp_path):
    from edm2.checkpoint import load_snapshot, save_network
    net, encoder, _ = load_snapshot(official('phema-snapshots') / 'network-snapshot-0000008-0.050.pkl')
    # A run with batch 1000 (not on the 1024 grid): the exact image count comes from the header.
    save_network(tmp_path / 'network-snapshot-0000002-0.050.safetensors', net, encoder, kimg=2, ema_std=0.05, nimg=2000)
    save_network(tmp_path / 'renamed.safetensors', net, encoder, kimg=3, ema_std=0.1, nimg=3000)
    save_network(tmp_path / 'run-0000004-0.100.safetensors', net, encoder)  # no metadata: the name decides
    (tmp_path / 'notes-0000005-0.100.txt').write_text('not a snapshot')
    save_network(tmp_path / 'phema-0000004-0.070.safetensors', net, encoder, kimg=4, ema_std=0.07, phema={})
    (tmp_path / '.tmp-1234-phema-0000004-0.080.safetensors').write_bytes(b'partial')
    found = {pathlib.Path(s.source).name: (s.kimg, s.std, s.nimg) for s in phema_reconstruct.find_snapshots(tmp_path)}
    assert found == {'network-snapshot-0000002-0.050.safetensors': (2, 0.05, 2000),
                     'renamed.safetensors': (3, 0.1, 3000), 'run-0000004-0.100.safetensors': (4, 0.1, 4096)}
    assert [s.kimg for s in phema_reconstruct.find_snapshots(tmp_path, inprefix='run', instd=[0.1])] == [4]


def test_in_memory_api_counts_reads_and_batches_do_not_change_results(tmp_path):
    """reconstruct(..., reads=Counter) counts each input once per batch, also for native inputs that are
    streamed one tensor at a time; batching changes neither the order nor a single bit of the outputs."""
    import collections

    from edm2.checkpoint import save_network
    from edm2.networks import build_network
    torch.manual_seed(0)
    net = build_network(dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1],
                             attn_resolutions=[], num_blocks=1))
    for kimg in (4, 8):
        for std in (0.05, 0.10):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p), alpha=0.1)
            save_network(tmp_path / f'network-snapshot-{kimg:07d}-{std:.3f}.safetensors', net, kimg=kimg, ema_std=std)
    snaps = phema_reconstruct.find_snapshots(tmp_path)
    stds = [0.06, 0.08, 0.12]
    results = {}
    for batch in (1, 2, 3):
        reads = collections.Counter()
        recs = list(phema_reconstruct.reconstruct(snaps, stds, batch=batch, reads=reads))
        batches = -(-len(stds) // batch)
        assert reads == {s.source: batches for s in snaps}
        assert [r.std for r in recs] == stds and all(r.kimg == 8 and r.nimg == 8192 for r in recs)
        results[batch] = [r.net.state_dict() for r in recs]
    for batch in (2, 3):
        for a, b in zip(results[1], results[batch]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # The plan alone reads nothing and gives the weights used.
    kimg, nimg, inputs, X = phema_reconstruct.plan_reconstruction(snaps, stds)
    assert (kimg, nimg, len(inputs), X.shape) == (8, 8192, 4, (4, 3))
    np.testing.assert_allclose([c for _, c in recs[0].coefficients], X[:, 0], rtol=0, atol=0)
