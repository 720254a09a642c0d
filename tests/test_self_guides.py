"""Guides made from the main network (edm2.self_guides): PAG and skip-layer against independent versions
written here, evaluation counts, the main network left untouched, and bad specs and block names."""

import copy
import json
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2.commands import calculate_metrics
import edm2
from edm2.commands import generate_images
from edm2 import generation, sampling
from edm2.checkpoint import save_network
from edm2.metrics import detectors
from edm2.mp import normalize
from edm2.networks import build_network
from edm2.self_guides import (PerturbedNetwork, SelfGuide, SelfGuideError, is_self_guide, parse_self_guide)

pytestmark = pytest.mark.usefixtures('one_thread')

ATTENTION = ['enc.8x8_block0', 'enc.8x8_block1', 'enc.8x8_block2', 'dec.8x8_in0', 'dec.8x8_block0',
             'dec.8x8_block1', 'dec.8x8_block2', 'dec.8x8_block3']


@pytest.fixture(scope='module')
def main_net():
    from conftest import fixture_path
    net, _, _ = edm2.load_snapshot(fixture_path('official', 'main-rgb16.pkl'))
    return net.eval().requires_grad_(False)


def _inputs(net, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=g) * 2.5
    labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, [n], generator=g), net.label_dim).float()
    return x, torch.tensor(2.5), labels


def _identity_attention(block):
    """The block's attention branch recomputed here with softmax scores masked to the identity (−inf off
    the diagonal), as an independent version of PAG's perturbation."""
    def branch(x, identity=False):  # the copy always uses the identity
        n, c, h, w = x.shape
        heads = block.num_heads
        qkv = normalize(block.attn_qkv(x).reshape(n, heads, c // heads, 3, h * w), dim=2)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]        # [n, head, channel, pixel]
        scores = torch.einsum('nhci,nhcj->nhij', q, k) / (c // heads) ** 0.5
        off_diagonal = ~torch.eye(h * w, dtype=torch.bool)
        weights = scores.masked_fill(off_diagonal, float('-inf')).softmax(dim=-1)
        out = torch.einsum('nhij,nhcj->nhci', weights, v)
        return block.attn_proj(out.reshape(n, c, h, w))
    return branch


def _patched_copy(net, names, how):
    twin = copy.deepcopy(net)
    blocks = {name: twin.unet.get_submodule(name) for name in names}
    for block in blocks.values():
        if how == 'pag':
            block._attention_branch = _identity_attention(block)
        else:
            block.forward = lambda x, emb, perturbation=None: x
    return twin


# ----------------------------------------------------------------------------------------------------
# Outputs against independent versions.

@pytest.mark.parametrize('spec, names', [
    ('self:pag', ATTENTION),
    ('self:pag=enc.8x8_block1,dec.8x8_in0', ['enc.8x8_block1', 'dec.8x8_in0']),
    ('self:pag=unet.dec.8x8_block3', ['dec.8x8_block3']),
])
def test_pag_equals_attention_forced_to_the_identity(main_net, spec, names):
    x, sigma, labels = _inputs(main_net)
    guide = parse_self_guide(spec).bind(main_net)
    expected = _patched_copy(main_net, names, 'pag')(x, sigma, labels)
    plain = main_net(x, sigma, labels)
    got = guide(x, sigma, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the perturbation changes the output
    assert torch.equal(main_net(x, sigma, labels), plain)  # and is gone afterwards


@pytest.mark.parametrize('names', [['dec.8x8_in1'], ['enc.16x16_block1', 'enc.8x8_block2', 'dec.8x8_in0']])
def test_skip_equals_blocks_replaced_by_the_identity(main_net, names):
    x, sigma, labels = _inputs(main_net, seed=1)
    guide = parse_self_guide('self:skip=' + ','.join(names)).bind(main_net)
    expected = _patched_copy(main_net, names, 'skip')(x, sigma, labels)
    plain = main_net(x, sigma, labels)
    got = guide(x, sigma, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2
    assert torch.equal(main_net(x, sigma, labels), plain)


def test_guide_shares_the_main_network_and_leaves_it_unperturbed_after_an_error(main_net):
    guide = parse_self_guide('self:pag').bind(main_net)
    assert guide.net is main_net and not hasattr(guide, 'parameters')
    assert (guide.img_channels, guide.img_resolution, guide.label_dim) == (3, 16, 10)
    x, sigma, labels = _inputs(main_net)
    plain = main_net(x, sigma, labels)
    with pytest.raises(RuntimeError):
        guide(x[:, :2], sigma, labels)  # wrong channel count: fails inside the perturbed network
    assert torch.equal(main_net(x, sigma, labels), plain)


# ----------------------------------------------------------------------------------------------------
# Threads sharing one network, and torch.compile.

def _tiny_attention_net():
    """A tiny network with attention at both levels whose scalar gains are 1 (they start at 0, which would
    make F, and so every perturbation, invisible)."""
    torch.manual_seed(0)
    net = build_network(dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                             num_blocks=1, attn_resolutions=[8, 4], channels_per_head=8))
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:
                param.fill_(1)
    return net.eval().requires_grad_(False)


@pytest.mark.slow
def test_threads_sharing_one_network_never_see_each_others_perturbation():
    """One thread samples with self:pag, one without, on the same network object, started together at a
    barrier: each thread's samples equal its single-threaded run bit for bit."""
    net = _tiny_attention_net()
    sigmas = sampling.edm_schedule(20)
    x, _, labels = _inputs(net, n=1)
    guidance = sampling.Guidance(guides=(parse_self_guide('self:pag').bind(net),), weight=3.0)
    runs = {'plain': lambda: sampling.heun_sampler(net, x, sigmas, labels),
            'pag': lambda: sampling.heun_sampler(guidance.denoiser(net), x, sigmas, labels)}
    alone = {name: run() for name, run in runs.items()}
    assert (alone['pag'] - alone['plain']).abs().max() > 1e-2  # the perturbation shows in the samples
    for _ in range(2):  # two rounds: more interleavings
        barrier, together, errors = threading.Barrier(2), {}, []

        def work(name):
            try:
                barrier.wait()
                together[name] = runs[name]()
            except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
                errors.append(e)
        threads = [threading.Thread(target=work, args=(name,)) for name in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for name in runs:
            assert torch.equal(together[name], alone[name]), name


@pytest.mark.slow
def test_compiled_network_with_self_guides_equals_eager():
    """torch.compile of the shared network: plain, PAG, skip and plain again each equal the eager network
    within float32 rounding (the compiled code follows the perturbation argument), also through the sampler,
    with no graph break.
    The backend 'eager' traces and guards as the default one does, without generating code (inductor took
    220 s here)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = _tiny_attention_net()
    compiled = torch.compile(net, backend='eager')
    x, sigma, labels = _inputs(net, n=2)
    plain = net(x, sigma, labels)
    for spec in ('self:pag', 'self:skip=dec.4x4_in1', None):
        if spec is None:
            torch.testing.assert_close(compiled(x, sigma, labels), plain, rtol=1e-5, atol=1e-5)
            continue
        eager_guide, compiled_guide = (parse_self_guide(spec).bind(n) for n in (net, compiled))
        perturbed = eager_guide(x, sigma, labels)
        assert (perturbed - plain).abs().max() > 1e-2
        torch.testing.assert_close(compiled_guide(x, sigma, labels), perturbed, rtol=1e-5, atol=1e-5)
    sigmas = sampling.edm_schedule(3)
    guided, eager = (sampling.Guidance(guides=(parse_self_guide('self:pag').bind(n),), weight=2.0).denoiser(n)
                     for n in (compiled, net))
    torch.testing.assert_close(sampling.heun_sampler(guided, x, sigmas, labels),
                               sampling.heun_sampler(eager, x, sigmas, labels), rtol=1e-4, atol=1e-4)
    assert not torch._dynamo.utils.counters['graph_break']  # the perturbation argument breaks no graph


# ----------------------------------------------------------------------------------------------------
# Evaluation counts through the sampler.

class _Recorder:
    """Counts the main network's forward calls, split by whether the perturbation was on."""

    def __init__(self, net, block_name):
        self.plain = self.perturbed = 0
        block = net.unet.get_submodule(block_name)

        def hook(module, args):  # args: (x, emb, perturbation of this block)
            if args[2] is None:
                self.plain += 1
            else:
                self.perturbed += 1
        self.handle = block.register_forward_pre_hook(hook)


@pytest.mark.parametrize('weight, interval, guided_steps', [
    (1.0, None, 0),                              # w = 1: the self guide is never evaluated
    (2.0, None, 4),                              # every step guided
    (2.0, sampling.StepInterval(1, 2), 2),       # only steps 1 and 2
    (2.0, sampling.SigmaInterval(1e3, 1e4), 0),  # an interval outside the schedule
])
def test_self_guide_evaluated_only_at_guided_evaluations(main_net, weight, interval, guided_steps):
    num_steps = 4
    guide = parse_self_guide('self:pag=dec.8x8_in0').bind(main_net)
    guidance = sampling.Guidance(guides=(guide,), weight=weight, interval=interval)
    denoiser = guidance.denoiser(main_net)
    sigmas = sampling.edm_schedule(num_steps)
    recorder = _Recorder(main_net, 'dec.8x8_in0')
    try:
        x, _, labels = _inputs(main_net, n=2)
        sampling.heun_sampler(denoiser, x, sigmas, labels, guided_steps=guidance.steps(sigmas))
    finally:
        recorder.handle.remove()
    guided_evals = 2 * guided_steps - (interval is None and guided_steps == num_steps)  # last step: 1 eval
    assert recorder.plain == 2 * num_steps - 1
    assert recorder.perturbed == guided_evals
    assert denoiser.num_evals == [2 * num_steps - 1, guided_evals]


# ----------------------------------------------------------------------------------------------------
# Specs and block names.

def test_spec_round_trip():
    assert is_self_guide('self:pag') and is_self_guide(' self:skip=a') and not is_self_guide('xs.pkl')
    assert parse_self_guide('self:pag') == SelfGuide('pag') and str(SelfGuide('pag')) == 'self:pag'
    spec = parse_self_guide(' self:pag = unet.enc.8x8_block1 , dec.8x8_in0 ')
    assert spec == SelfGuide('pag', ('enc.8x8_block1', 'dec.8x8_in0'))
    assert str(spec) == 'self:pag=enc.8x8_block1,dec.8x8_in0' and parse_self_guide(str(spec)) == spec
    assert str(parse_self_guide('self:skip=dec.8x8_in1')) == 'self:skip=dec.8x8_in1'
    assert isinstance(parse_self_guide('self:skip=dec.8x8_in1'), SelfGuide)


@pytest.mark.parametrize('spec, message', [
    ('self:foo', 'unknown self guide'),
    ('self:', 'unknown self guide'),
    ('self:skip', 'needs the blocks to skip'),
    ('self:skip=', "'' is not a block name"),
    ('self:pag=a,,b', "'' is not a block name"),
    ('self:pag=a b', "'a b' is not a block name"),
    ('self:pag=enc.8x8_block1,enc.8x8_block1', 'given twice'),
    ('xs.pkl', 'is not a self guide'),
])
def test_bad_specs(spec, message):
    with pytest.raises(SelfGuideError, match=message) as info:
        parse_self_guide(spec)
    assert '\n' not in str(info.value) and isinstance(info.value, edm2.errors.EDM2Error)


@pytest.mark.parametrize('spec, message', [
    ('self:pag=enc.8x8_nope', "'enc.8x8_nope' is not a block of the network; attention blocks: enc.8x8_block0"),
    ('self:pag=dec.8x8_in1', "'dec.8x8_in1' has no self-attention; attention blocks: "
                             + ', '.join(ATTENTION)),
    ('self:skip=dec.8x8_block0', "'dec.8x8_block0' changes the shape of its input; blocks whose input and output "
                                 'shapes agree: enc.16x16_block0'),
    ('self:skip=enc.8x8_down', "'enc.8x8_down' changes the shape"),
    ('self:skip=dec.16x16_up', "'dec.16x16_up' changes the shape"),
])
def test_bad_block_names_name_the_block_and_the_allowed_ones(main_net, spec, message):
    with pytest.raises(SelfGuideError) as info:
        parse_self_guide(spec).bind(main_net)
    assert message in str(info.value) and '\n' not in str(info.value)


def test_pag_needs_attention_and_an_edm2_network():
    net = build_network(dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1],
                             num_blocks=1, attn_resolutions=[]))
    with pytest.raises(SelfGuideError, match='no self-attention blocks'):
        parse_self_guide('self:pag').bind(net)
    assert isinstance(parse_self_guide('self:skip=enc.8x8_block0').bind(net), PerturbedNetwork)
    with pytest.raises(SelfGuideError, match='needs an EDM2 network'):
        parse_self_guide('self:pag').bind(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------
# --gnet self:... in both generating commands.

def _generate(*args):
    return CliRunner().invoke(generate_images.main, [str(a) for a in args])


def _gen(*args, ref):
    weights = ['--inception-weights', ref.parent / 'inception-tiny.pth', '--workers', 0]
    return CliRunner().invoke(calculate_metrics.cli, ['gen', '--ref', ref] + [str(a) for a in list(args) + weights])


@pytest.fixture(scope='module')
def cli_files(tmp_path_factory):
    """FID statistics and tiny Inception weights for `gen`, and a network without attention."""
    folder = tmp_path_factory.mktemp('self-guide-cli')
    np.savez(folder / 'ref.npz', mu=np.zeros(128), sigma=np.eye(128))
    torch.save(detectors.random_state_dict('inception', width_divisor=16), folder / 'inception-tiny.pth')
    torch.manual_seed(0)
    save_network(folder / 'plain.safetensors', build_network(dict(
        img_resolution=16, img_channels=3, label_dim=10, model_channels=8, channel_mult=[1], num_blocks=1,
        attn_resolutions=[])))
    return dict(ref=folder / 'ref.npz', plain=folder / 'plain.safetensors')


@pytest.mark.parametrize('net, spec, message', [
    ('main', 'self:pag=enc.8x8_nope', "'enc.8x8_nope' is not a block of the network; attention blocks: enc.8x8_block0"),
    ('main', 'self:pag=dec.8x8_in1', "'dec.8x8_in1' has no self-attention"),
    ('main', 'self:skip=dec.8x8_block0', "'dec.8x8_block0' changes the shape of its input; blocks whose input"),
    ('main', 'self:foo', "unknown self guide 'self:foo'"),
    ('main', 'self:skip', 'self:skip needs the blocks'),
    ('plain', 'self:pag', 'self:pag: the network has no self-attention blocks'),
])
def test_bad_self_guides_in_both_commands(official, cli_files, tmp_path, net, spec, message):
    net = official('main-rgb16.pkl') if net == 'main' else cli_files['plain']
    out = tmp_path / 'out'
    result = _generate('--net', net, '--gnet', spec, '--guidance', 2, '--outdir', out, '--steps', 2, '--seeds', '0-1')
    for result in (result, _gen('--net', net, '--gnet', spec, '--guidance', 2, '--metrics', 'fid', '--num', 2,
                                '--steps', 2, '--out', tmp_path / 'r.json', ref=cli_files['ref'])):
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith('Error')]
        assert len(errors) == 1 and "'--gnet'" in errors[0] and message in errors[0], result.output
        assert 'Traceback' not in result.output
    assert not out.exists() and not (tmp_path / 'r.json').exists()


@pytest.mark.slow
def test_a_real_guide_and_a_self_guide_together(official, cli_files, tmp_path):
    net_path, gnet_path = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    flags = ['--net', net_path, '--gnet', gnet_path, '--gnet', 'self:pag', '--guide-weights', '0.5,0.5',
             '--guidance', 2, '--steps', 4]
    result = _generate(*flags, '--seeds', '0-2', '--outdir', tmp_path / 'out')
    assert result.exit_code == 0, result.output
    written = torch.stack([torch.from_numpy(np.array(PIL.Image.open(tmp_path / 'out' / f'{s:06d}.png')))
                           .permute(2, 0, 1) for s in range(3)])
    net, encoder, _ = edm2.load_snapshot(net_path)
    gnet = edm2.load_snapshot(gnet_path)[0].eval()
    guidance = sampling.Guidance(guides=(gnet, parse_self_guide('self:pag').bind(net.eval())), weight=2.0,
                                 shares=(0.5, 0.5))
    library = torch.cat([b.images for b in generation.generate(net, range(3), guidance=guidance, encoder=encoder,
                                                               sigmas=sampling.edm_schedule(4))])
    assert torch.equal(written, library)
    real_only = sampling.Guidance(guides=(gnet,), weight=2.0)
    other = torch.cat([b.images for b in generation.generate(net, range(3), guidance=real_only, encoder=encoder,
                                                             sigmas=sampling.edm_schedule(4))])
    assert not torch.equal(other, library)
    result = _gen(*flags, '--metrics', 'fid', '--num', 3, '--out', tmp_path / 'r.json', ref=cli_files['ref'])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / 'r.json').read_text())
    assert record['gnet'] == [str(gnet_path), 'self:pag'] and record['guide_weights'] == [0.5, 0.5]
