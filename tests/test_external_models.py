"""Text-to-image models of diffusers as EDM denoisers (`edm2.external`): the denoiser against the x0 of diffusers'
own schedulers, our Euler sampler against diffusers' own pipelines (DDIM η = 0, flow-matching Euler) with CFG,
the command line end to end, and the one-line refusals. Tiny random models built from configs in the tests."""

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

from edm2 import sampling
from edm2.commands import generate_images
from edm2.external import specs
from edm2.external.denoisers import DDPMDenoiser, TextCond

pytestmark = pytest.mark.usefixtures('one_thread')


def run_cli(*args):
    result = CliRunner().invoke(generate_images.main, [str(a) for a in args])
    return result.exit_code, result.output


def last_line(output):
    return output.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------
# Configuration checks: JSON only (no diffusers needed).

def write_model(folder, pipeline='IFPipeline', unet=None, scheduler=None, text=None, vae=None, denoiser='unet'):
    """A folder with the configuration files of a pipeline (no weights): enough for `specs.read_model`."""
    os.makedirs(folder, exist_ok=True)
    index = {'_class_name': pipeline, denoiser: ['diffusers', 'X'], 'scheduler': ['diffusers', 'DDPMScheduler'],
             'text_encoder': ['transformers', 'T5EncoderModel']}
    if vae is not None:
        index['vae'] = ['diffusers', 'AutoencoderKL']
    parts = {'model_index.json': index,
             f'{denoiser}/config.json': unet or dict(in_channels=3, sample_size=64, encoder_hid_dim=4096,
                                                     cross_attention_dim=1280),
             'scheduler/scheduler_config.json': scheduler or dict(_class_name='DDPMScheduler',
                                                                  prediction_type='epsilon'),
             'text_encoder/config.json': text or dict(d_model=4096, num_layers=24)}
    if vae is not None:
        parts['vae/config.json'] = vae
    for name, value in parts.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), 'w') as f:
            json.dump(value, f)
    return f'diffusers:{folder}'


def test_guide_of_another_width_is_accepted_when_inputs_agree(tmp_path):
    """IF-I-M guiding IF-I-XL: the same T5 embeddings, projected to different internal widths."""
    main = specs.read_model(write_model(tmp_path / 'xl', unet=dict(in_channels=3, sample_size=64, encoder_hid_dim=4096,
                                                                      cross_attention_dim=2560)))
    guide = specs.read_model(write_model(tmp_path / 'm'))
    specs.check_guide(main, guide)
    assert main.family.kind == 'ddpm' and main.input_shape == (3, 64)


@pytest.mark.parametrize('change, message', [
    (dict(pipeline='StableDiffusion3Pipeline', denoiser='transformer', vae={},
          scheduler=dict(_class_name='FlowMatchEulerDiscreteScheduler')), 'a guide must be of the same family'),
    (dict(unet=dict(in_channels=3, sample_size=32, encoder_hid_dim=4096)), 'takes input of (channels, resolution) (3, 32)'),
    (dict(unet=dict(in_channels=3, sample_size=64, encoder_hid_dim=1024)), 'takes a text embedding width of 1024'),
    (dict(text=dict(d_model=4096, num_layers=12)), 'its text_encoder differs'),
])
def test_main_and_guide_that_differ_are_refused_before_loading(tmp_path, change, message):
    main = write_model(tmp_path / 'main')
    guide = write_model(tmp_path / 'guide', **change)
    code, out = run_cli('--net', main, '--gnet', guide, '--guidance', 2, '--prompt', 'a cat', '--outdir', tmp_path / 'o')
    assert code != 0 and message in last_line(out) and last_line(out).startswith('Error: --gnet: diffusers:')
    assert not (tmp_path / 'o').exists()


def test_not_a_diffusers_folder_and_unsupported_family(tmp_path):
    (tmp_path / 'empty').mkdir()
    code, out = run_cli('--net', f'diffusers:{tmp_path / "empty"}', '--prompt', 'a', '--outdir', tmp_path / 'o')
    assert code != 0 and last_line(out) == (f'Error: --net: diffusers:{tmp_path / "empty"}: not a diffusers model '
                                            'folder (no model_index.json)')
    flux = write_model(tmp_path / 'flux', pipeline='FluxPipeline', denoiser='transformer')
    code, out = run_cli('--net', flux, '--prompt', 'a', '--outdir', tmp_path / 'o')
    assert code != 0 and 'Error: --net: ' in last_line(out) and 'FluxPipeline models are not supported' in out
    code, out = run_cli('--net', f'diffusers:{tmp_path / "nowhere"}', '--prompt', 'a', '--outdir', tmp_path / 'o')
    assert code != 0 and 'no such folder' in last_line(out)
    zero_snr = write_model(tmp_path / 'zsnr', scheduler=dict(_class_name='DDIMScheduler', rescale_betas_zero_snr=True))
    code, out = run_cli('--net', zero_snr, '--prompt', 'a', '--outdir', tmp_path / 'o')
    assert code != 0 and 'rescale_betas_zero_snr' in last_line(out)


def test_missing_extra_is_one_line_before_any_network(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers raises ImportError
    net = write_model(tmp_path / 'if')
    code, out = run_cli('--net', net, '--prompt', 'a cat', '--outdir', tmp_path / 'o')
    assert code != 0 and last_line(out).startswith(f'Error: --net {net}: need the diffusers extra')
    assert last_line(out).endswith('pip install -e ".[diffusers]"')


@pytest.mark.parametrize('args, message', [
    (['--gnet', 'self:pag', '--guidance', 2], 'self guides perturb the blocks of EDM2 networks'),
    (['--gnet', 'x.pkl', '--guidance', 2], 'a diffusers main model is guided by diffusers models'),
    (['--stage3', 'diffusers:x'], '--stage3 continues --stage2'),
    (['--class', 3], '--class does not apply to text-to-image runs'),
    (['--negative-prompt', 'bad'], '--negative-prompt is the prompt of --gnet uncond'),
    (['--sigma_max', 10], '--sigma_max: a diffusers model is sampled between its own sigma_min and sigma_max'),
    (['--guidance-interval-steps', '3,9', '--gnet', 'uncond', '--guidance', 2, '--steps', 8],
     'lie outside the schedule of 8 steps'),
])
def test_refusals_of_text_runs(tmp_path, args, message):
    net = write_model(tmp_path / 'if')
    code, out = run_cli('--net', net, '--prompt', 'a cat', '--outdir', tmp_path / 'o', *args)
    assert code != 0 and message in last_line(out), out


def test_stage2_needs_if(tmp_path):
    net = write_model(tmp_path / 'sd', pipeline='StableDiffusionPipeline', vae={})
    stage = write_model(tmp_path / 'if2', pipeline='IFSuperResolutionPipeline')
    code, out = run_cli('--net', net, '--prompt', 'a', '--outdir', tmp_path / 'o', '--stage2', stage)
    assert code != 0 and 'super-resolution stages continue DeepFloyd IF stage I' in last_line(out)
    code, out = run_cli('--net', write_model(tmp_path / 'if'), '--prompt', 'a', '--outdir', tmp_path / 'o',
                        '--stage2', net)
    assert code != 0 and 'is not a super-resolution stage' in last_line(out)


@pytest.mark.parametrize('args, message', [
    (['--prompt', 'a cat'], '--prompt needs a diffusers text-to-image model'),
    (['--schedule', 'model'], '--schedule model needs a diffusers text-to-image model'),
    (['--gnet', 'uncond', '--guidance', 2], "'uncond' is classifier-free guidance of a diffusers"),
])
def test_text_flags_with_an_edm2_network_are_refused(tmp_path, args, message):
    code, out = run_cli('--net', tmp_path / 'missing.pkl', '--outdir', tmp_path / 'o', *args)
    assert code != 0 and message in last_line(out), out


# ----------------------------------------------------------------------------------------------------
# The adapters without diffusers.

def test_timestep_is_exact_at_the_table_and_monotone_between():
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).to(torch.float32)
    seen = []
    net = DDPMDenoiser(lambda x, t, c: (seen.append(t), x)[1], abar, 'epsilon', img_channels=1, img_resolution=1,
                       label_dim=1)
    table = net.sigma_table.to(torch.float32)  # the σ's of a float32 schedule
    for t in (0, 1, 17, 500, 998, 999):
        assert net.timestep(table[t]).item() == t
    between = net.timestep(torch.tensor([(table[10] * table[11]).sqrt()], dtype=torch.float64))
    assert 10 < between.item() < 11
    levels = torch.logspace(-2, 2, 50)
    assert (net.timestep(levels).diff() > 0).all()
    x = torch.randn(2, 1, 1, 1)
    out = net(x, table[300], None)  # the fake network returns its input x/sqrt(1+σ²) as ε
    s = table[300]
    torch.testing.assert_close(out, x - s * x / (1 + s ** 2).sqrt())
    assert seen[-1].tolist() == [300.0, 300.0]


def test_euler_solver_takes_one_evaluation_per_step():
    calls = []

    def denoiser(x, sigma, labels):
        calls.append(float(sigma))
        return 0.5 * x
    sigmas = sampling.edm_schedule(5)
    noise = torch.randn(2, 3, 4, 4)
    x = sampling.heun_sampler(denoiser, noise, sigmas, options=sampling.HeunOptions(solver='euler'))
    expected = noise * sigmas[0]
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        expected = expected + (t - s) * (expected - 0.5 * expected) / s
    torch.testing.assert_close(x, expected)
    assert calls == pytest.approx(sigmas[:-1].tolist())
    with pytest.raises(sampling.SamplingError, match="unknown solver 'rk4'"):
        sampling.HeunOptions(solver='rk4')


def test_text_cond_rows():
    cond = TextCond(torch.arange(6.).reshape(3, 2, 1), torch.arange(3.).reshape(3, 1))
    picked = cond.take([2, 0])
    assert picked.embeds[:, 0, 0].tolist() == [4, 0] and picked.pooled[:, 0].tolist() == [2, 0]
    assert len(cond.take([1]).expand(4)) == 4


# ----------------------------------------------------------------------------------------------------
# Against diffusers, with tiny random models.

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    pytest.importorskip('diffusers')
    pytest.importorskip('transformers')
    import tiny_diffusers as tiny
    root = tmp_path_factory.mktemp('diffusers-models')
    return dict(
        if_=tiny.save_if(str(root / 'if')), if_small=tiny.save_if(str(root / 'if-small'), seed=3, width=4),
        if2=tiny.save_if_stage2(str(root / 'if2')), sd=tiny.save_sd(str(root / 'sd')),
        sd3=tiny.save_sd3(str(root / 'sd3')))


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['if_', 'sd'])
def test_ddpm_denoiser_equals_the_schedulers_x0(models, name):
    """IF-style ε with learned variance, and a v-prediction UNet: D at the scheduler's σ's is DDIM's x0."""
    from diffusers import DDIMScheduler

    import edm2
    net = edm2.load_network(f'diffusers:{models[name]}')
    scheduler = DDIMScheduler.from_config(net.info.scheduler, thresholding=False, clip_sample=False)
    assert net.prediction == ('epsilon' if name == 'if_' else 'v_prediction')
    scheduler.set_timesteps(10)
    cond = net.encode_prompt(['a cat', 'blue dog'])
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        x_t = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution, generator=generator)
        out = net.network(x_t, t, encoder_hidden_states=cond.embeds, return_dict=False)[0][:, :net.img_channels]
        x0 = scheduler.step(out, t, x_t).pred_original_sample
        abar = scheduler.alphas_cumprod[t]
        sigma = net.sigma_table[t].to(torch.float32)
        assert relative(net(x_t / abar.sqrt(), sigma, cond), x0) < 1e-5


@pytest.mark.slow
def test_flow_denoiser_and_euler_step_equal_the_schedulers(models):
    import edm2
    net = edm2.load_network(f'diffusers:{models["sd3"]}')
    scheduler = net.scheduler.__class__.from_config(net.scheduler.config)
    scheduler.set_timesteps(6)
    cond = net.encode_prompt(['a cat', 'blue dog'])
    assert cond.pooled.shape == (2, 32)
    generator = torch.Generator().manual_seed(1)
    for i, t in enumerate(scheduler.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=generator)
        u = net.network(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=cond.embeds,
                        pooled_projections=cond.pooled, return_dict=False)[0]
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        denoised = net(x, sigma, cond)
        assert relative(denoised, x - sigma * u) < 1e-5
        step = scheduler.step(u, t, x).prev_sample
        assert relative(x + (sigma_next - sigma) * sampling.ode_derivative(x, sigma, denoised), step) < 1e-5


def our_run(path, prompts, seeds, steps, negative=''):
    from edm2.external import loading
    from edm2.external.denoisers import UncondGuide
    from edm2.external.text_to_image import TextSampler, encode_prompts
    net = loading.load_denoiser(f'diffusers:{path}')
    encoded = encode_prompts(net, prompts, negative)
    guidance = sampling.Guidance(guides=(UncondGuide(net, encoded.negative),), weight=4.0)
    sampler = TextSampler(net, encoded, guidance=guidance, sigmas=net.model_schedule(steps),
                          options=sampling.HeunOptions(solver='euler'))
    return sampler(list(enumerate(seeds)))[0]


@pytest.mark.slow
def test_euler_with_model_schedule_is_the_if_pipelines_ddim_with_cfg(models):
    from diffusers import DDIMScheduler, IFPipeline
    prompts, seeds = ['a cat', 'red dog'], [3, 7]
    ours = our_run(models['if_'], prompts, seeds, 6)
    pipe = IFPipeline.from_pretrained(models['if_'])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, thresholding=False, clip_sample=False)
    pipe.scheduler.register_to_config(variance_type='fixed_small')  # the pipeline then drops the variance channels
    reference = pipe(prompt=prompts, num_inference_steps=6, guidance_scale=4, output_type='pt', clean_caption=False,
                     generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert relative(ours, reference) < 1e-4


@pytest.mark.slow
def test_euler_with_model_schedule_is_the_sd3_pipelines_flow_matching_with_cfg(models):
    from diffusers import StableDiffusion3Pipeline
    prompts, seeds = ['a cat', 'red dog'], [3, 7]
    ours = our_run(models['sd3'], prompts, seeds, 5)
    pipe = StableDiffusion3Pipeline.from_pretrained(models['sd3'])
    pipe.set_progress_bar_config(disable=True)
    latents = torch.stack([torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(s)) for s in seeds])
    reference = pipe(prompt=prompts, num_inference_steps=5, guidance_scale=4, latents=latents,
                     output_type='latent').images
    assert relative(ours, reference) < 1e-4


def read_images(folder):
    import numpy as np
    import PIL.Image
    return {name: np.array(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
            if name.endswith('.png')}


@pytest.mark.slow
def test_command_line_autoguidance_cfg_and_stage2(models, tmp_path):
    base = ['--net', f'diffusers:{models["if_"]}', '--prompt', 'a cat', '--prompt', 'red dog', '--seeds', '0-1',
            '--steps', 3, '--device', 'cpu', '--batch', 3]
    code, out = run_cli(*base, '--gnet', f'diffusers:{models["if_small"]}', '--gnet', 'uncond',
                        '--guide-weights', '0.5,0.5', '--guidance', 3, '--stage2', f'diffusers:{models["if2"]}',
                        '--outdir', tmp_path / 'both')
    assert code == 0, out
    images = read_images(tmp_path / 'both')
    assert sorted(images) == ['0000-000000.png', '0000-000001.png', '0001-000000.png', '0001-000001.png']
    assert all(image.shape == (16, 16, 3) for image in images.values())  # stage II doubled the resolution
    assert (tmp_path / 'both' / 'prompts.txt').read_text() == 'a cat\nred dog\n'
    # A guide that is the main model itself leaves D unchanged: the images of an unguided run.
    code, out = run_cli(*base, '--outdir', tmp_path / 'plain')
    assert code == 0, out
    code, out = run_cli(*base, '--gnet', f'diffusers:{models["if_"]}', '--guidance', 3, '--outdir', tmp_path / 'self')
    assert code == 0, out
    plain, same = read_images(tmp_path / 'plain'), read_images(tmp_path / 'self')
    assert all(abs(plain[k].astype(int) - same[k].astype(int)).max() <= 1 for k in plain)
    code, out = run_cli(*base, '--gnet', 'uncond', '--guidance', 3, '--outdir', tmp_path / 'cfg')
    assert code == 0, out
    cfg = read_images(tmp_path / 'cfg')
    assert all(abs(plain[k].astype(int) - cfg[k].astype(int)).max() > 4 for k in plain)
    # Resuming writes nothing; other prompts in the folder are refused.
    code, out = run_cli(*base, '--gnet', 'uncond', '--guidance', 3, '--outdir', tmp_path / 'cfg', '--skip-existing')
    assert code == 0 and 'Done: 0 images written.' in out
    code, out = run_cli(*base[:2], '--prompt', 'blue dog', *base[6:], '--outdir', tmp_path / 'cfg', '--skip-existing')
    assert code != 0 and 'lists other prompts than this run' in last_line(out)


@pytest.mark.slow
def test_command_line_sd3_apg_interval_and_heun(models, tmp_path):
    code, out = run_cli('--net', f'diffusers:{models["sd3"]}', '--prompt', 'a cat', '--seeds', '4', '--steps', 4,
                        '--gnet', 'uncond', '--negative-prompt', 'bad photo', '--guidance', 2.5, '--device', 'cpu',
                        '--guidance-rule', 'apg:eta=0,momentum=-0.5,threshold=15', '--guidance-interval', '0.1,0.9',
                        '--outdir', tmp_path / 'o')
    assert code == 0, out
    assert read_images(tmp_path / 'o')['0000-000004.png'].shape == (8, 8, 3)  # decoded by the VAE


def test_if_presets_are_the_papers_pairing():
    from edm2 import presets
    from edm2.commands import guidance_setup
    setup = guidance_setup.resolve('if-xl-autog-m')
    assert setup.net == 'diffusers:DeepFloyd/IF-I-XL-v1.0'
    assert setup.gnets == ('diffusers:DeepFloyd/IF-I-M-v1.0', 'uncond') and sum(setup.shares) == 1
    assert guidance_setup.resolve('if-xl-cfg').gnets == ('uncond',)
    for name in ('if-xl-autog-m', 'if-xl-cfg'):
        assert presets.get('generate', name)['stage2'] == 'diffusers:DeepFloyd/IF-II-L-v1.0'
        assert specs.parse_spec(presets.get('generate', name)['net']).source == 'DeepFloyd/IF-I-XL-v1.0'


@pytest.mark.slow
def test_stage3_is_the_upscalers_own_run(models, tmp_path):
    """The x4 upscaler's hand-off: images in [−1, 1] in and out, equal to the pipeline's own 'np' output."""
    import tiny_diffusers as tiny

    from edm2.external.loading import SuperResolution
    stage = SuperResolution(f'diffusers:{tiny.save_upscaler(str(tmp_path / "up"))}', 'cpu')
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = stage(images, ['a cat', 'red dog'], None, None, 'bad', [torch.Generator().manual_seed(s) for s in (0, 1)])
    reference = stage.pipe(prompt=['a cat', 'red dog'], image=(images + 1) / 2, negative_prompt=['bad', 'bad'],
                           generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type='np').images
    torch.testing.assert_close(ours, torch.from_numpy(reference).permute(0, 3, 1, 2) * 2 - 1, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_text_preset_gives_its_stage2_and_schedule(models, tmp_path, monkeypatch):
    from edm2 import presets
    configs = tmp_path / 'configs'
    configs.mkdir()
    (configs / 'generate.toml').write_text(
        f"[tiny-if]\nnet = 'diffusers:{models['if_']}'\ngnet = ['diffusers:{models['if_small']}', 'uncond']\n"
        f"guidance = 3.0\nguide_weights = [0.25, 0.75]\nstage2 = 'diffusers:{models['if2']}'\nschedule = 'model'\n")
    monkeypatch.setenv('EDM2_CONFIG_DIR', str(configs))
    presets.load.cache_clear()
    common = ['--prompt', 'a cat', '--seeds', '5', '--steps', 3, '--device', 'cpu']
    try:
        code, out = run_cli('--preset', 'tiny-if', *common, '--outdir', tmp_path / 'preset')
        assert code == 0, out
    finally:
        presets.load.cache_clear()
    code, out = run_cli('--net', f'diffusers:{models["if_"]}', '--gnet', f'diffusers:{models["if_small"]}',
                        '--gnet', 'uncond', '--guidance', 3, '--guide-weights', '0.25,0.75', '--schedule', 'model',
                        '--stage2', f'diffusers:{models["if2"]}', *common, '--outdir', tmp_path / 'flags')
    assert code == 0, out
    by_preset, by_flags = read_images(tmp_path / 'preset'), read_images(tmp_path / 'flags')
    assert by_preset.keys() == by_flags.keys() == {'0000-000005.png'}
    assert (by_preset['0000-000005.png'] == by_flags['0000-000005.png']).all()
    assert by_flags['0000-000005.png'].shape == (16, 16, 3)
