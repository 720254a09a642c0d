"""Building diffusers models: the denoiser adapters, the text encoders, the VAE decoder and the super-resolution
stages of a `diffusers:` spec, with the optional `diffusers` extra (imported here, only when such a spec is given).

Everything that can be checked from the configuration files is checked first (`edm2.external.specs`); only then
is a network built. Text encoders are built when prompts are encoded and freed after (`release`), so that
they do not share the device with the denoisers during sampling.
"""

import contextlib
import gc
import importlib
import os
import warnings

import torch

from ..errors import one_line
from .denoisers import DDPMDenoiser, FlowDenoiser, TextCond
from .specs import ExternalModelError, ModelInfo, read_model, read_stage

EXTRA = 'pip install -e ".[diffusers]"'


def require_extra(what: str = 'diffusers: models'):
    """(diffusers, transformers) modules, or ExternalModelError naming the extra."""
    try:
        transformers = importlib.import_module('transformers')  # first: diffusers notes at import what is there
        diffusers = importlib.import_module('diffusers')
    except ImportError as e:
        raise ExternalModelError(f'{what} need the diffusers extra ({one_line(e)}): {EXTRA}') from None
    return diffusers, transformers


def default_dtype(info: ModelInfo, device) -> torch.dtype:
    """float32 on CPU; on a GPU the precision the model family is published and run in (IF: float16; SD and
    SD3: bfloat16)."""
    if torch.device(device).type == 'cpu':
        return torch.float32
    return torch.float16 if info.family.name == 'if' else torch.bfloat16


def _root(info: ModelInfo) -> str:
    return _spec_root(info.spec)


def _spec_root(spec) -> str:
    if spec.local:
        return os.path.join(spec.source, spec.subfolder or '')
    if spec.subfolder:
        raise ExternalModelError(f'{spec}: #SUBFOLDER is supported for local folders only')
    return spec.source


def _pretrained(cls, root, spec, dtype, **kwargs):
    """cls.from_pretrained, asking a hub repository for its float16 weight files first when running in
    float16 (IF's repositories hold both; the float32 ones are twice the download)."""
    with _quiet():
        if dtype == torch.float16 and not spec.local:
            try:
                return cls.from_pretrained(root, torch_dtype=dtype, variant='fp16', **kwargs)
            except (OSError, ValueError):
                pass
        return cls.from_pretrained(root, torch_dtype=dtype, **kwargs)


def _component(info: ModelInfo, name: str, dtype):
    diffusers, _ = require_extra()
    library, class_name = info.components[name]
    module = diffusers if library == 'diffusers' else importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ExternalModelError(f'{info.spec}: {library} has no {class_name} (component {name}); '
                                 'a newer version may be needed')
    try:
        return _pretrained(cls, _root(info), info.spec, dtype, subfolder=name)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise ExternalModelError(f'{info.spec}: cannot load {name} ({one_line(e)})') from None


@contextlib.contextmanager
def _quiet():
    """diffusers' FutureWarning about `torch_dtype` (still the keyword its older releases know)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*torch_dtype.*', category=FutureWarning)
        yield


def _text_width(info: ModelInfo) -> int:
    config = info.denoiser
    return int(config.get('joint_attention_dim') or config.get('encoder_hid_dim') or config.get('cross_attention_dim')
               or 0)


class PipelineTextEncoder:
    """The model's text encoders and tokenizers, through its own diffusers pipeline (without its denoiser and
    VAE), so that the embeddings are exactly those the pipeline computes. Built on first use."""

    def __init__(self, info: ModelInfo, device, dtype):
        self.info, self.device, self.dtype, self.pipe = info, torch.device(device), dtype, None

    def _build(self):
        diffusers, _ = require_extra()
        family = self.info.family
        skip = {family.denoiser: None}
        for name in ('vae', 'safety_checker', 'feature_extractor', 'watermarker', 'image_encoder'):
            if name in self.info.components:
                skip[name] = None
        if 'requires_safety_checker' in self.info.components or family.name in ('if', 'sd'):
            skip['requires_safety_checker'] = False
        cls = getattr(diffusers, self.info.pipeline)
        try:
            pipe = _pretrained(cls, _root(self.info), self.info.spec, self.dtype, **skip)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise ExternalModelError(f'{self.info.spec}: cannot load the text encoders ({one_line(e)})') from None
        self.pipe = pipe.to(self.device)

    @torch.no_grad()
    def encode(self, prompts) -> TextCond:
        if self.pipe is None:
            self._build()
        pipe, name = self.pipe, self.info.family.name
        if name == 'if':
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                           clean_caption=False)
            return TextCond(embeds)
        if name == 'sd':
            embeds, _ = pipe.encode_prompt(prompts, self.device, 1, False)
            return TextCond(embeds)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=self.device,
                                                  do_classifier_free_guidance=False)
        return TextCond(embeds, pooled)

    def release(self):
        self.pipe = None
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()


def load_denoiser(spec, device='cpu', dtype=None, info: ModelInfo = None, text: bool = True):
    """The denoiser of the diffusers model `spec` on `device`, in eval mode (float32 on CPU by default); with
    `text`, its `encode_prompt` loads the model's text encoders when first called."""
    info = read_model(spec) if info is None else info
    diffusers, _ = require_extra(f'{info.spec}:')
    device = torch.device(device if device is not None else 'cpu')
    dtype = default_dtype(info, device) if dtype is None else dtype
    network = _component(info, info.family.denoiser, dtype).to(device).eval().requires_grad_(False)
    channels, resolution = info.input_shape
    common = dict(img_channels=channels, img_resolution=resolution, label_dim=_text_width(info), dtype=dtype,
                  name=str(info.spec), encoder=PipelineTextEncoder(info, device, dtype) if text else None)
    if info.family.kind == 'ddpm':
        scheduler = diffusers.DDIMScheduler.from_config(info.scheduler)

        def call(x, t, cond):
            return network(x, t, encoder_hidden_states=cond.embeds.to(dtype), return_dict=False)[0]
        net = DDPMDenoiser(call, scheduler.alphas_cumprod, info.scheduler.get('prediction_type', 'epsilon'),
                           scheduler=scheduler, **common)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(info.scheduler)

        def call(x, t, cond):
            return network(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds.to(dtype),
                           pooled_projections=cond.pooled.to(dtype), return_dict=False)[0]
        net = FlowDenoiser(call, scheduler.config.num_train_timesteps, scheduler.sigma_min, scheduler.sigma_max,
                           scheduler=scheduler, **common)
        if scheduler.config.get('use_dynamic_shifting'):
            net.mu = _dynamic_shift(info, resolution)
    net.network, net.info = network, info
    return net


def _dynamic_shift(info, resolution):
    """μ of a flow scheduler with dynamic shifting, from the image's token count (SD3 pipeline's rule)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
    patch = int(info.denoiser.get('patch_size', 1))
    config = info.scheduler
    return calculate_shift((resolution // patch) ** 2, config.get('base_image_seq_len', 256),
                           config.get('max_image_seq_len', 4096), config.get('base_shift', 0.5),
                           config.get('max_shift', 1.16))


class LatentDecoder:
    """The pipeline's VAE: latents x (at σ = 0) -> uint8 RGB images."""

    def __init__(self, info: ModelInfo, device, dtype):
        self.vae = _component(info, 'vae', dtype).to(device).eval().requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.get('shift_factor', None) or 0.0)
        self.dtype = dtype

    @torch.no_grad()
    def pixels(self, x):
        """Latents -> pixels in [−1, 1] (float32)."""
        z = x / self.scale + self.shift
        return self.vae.decode(z.to(self.dtype), return_dict=False)[0].to(torch.float32)


class SuperResolution:
    """A super-resolution stage run by diffusers' own pipeline with classifier-free guidance (IF stage II:
    IFSuperResolutionPipeline, given the stage-I prompt embeddings; or the x4 upscaler,
    StableDiffusionUpscalePipeline, given the prompts)."""

    def __init__(self, spec, device, dtype=None):
        self.spec, self.kind = read_stage(spec)
        diffusers, _ = require_extra(f'{self.spec}:')
        device = torch.device(device)
        dtype = (torch.float32 if device.type == 'cpu' else torch.float16) if dtype is None else dtype
        skip = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        if self.kind == 'IFSuperResolutionPipeline':
            skip.update(text_encoder=None, tokenizer=None)
        else:
            skip.pop('watermarker')
            skip.pop('requires_safety_checker')
        try:
            pipe = _pretrained(getattr(diffusers, self.kind), _spec_root(self.spec), self.spec, dtype, **skip)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise ExternalModelError(f'{self.spec}: cannot load ({one_line(e)})') from None
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, images, prompts, cond: TextCond, negative: TextCond, negative_prompt, generators):
        """Images in [−1, 1] -> the larger images in [−1, 1]."""
        n = images.shape[0]
        if self.kind == 'IFSuperResolutionPipeline':
            out = self.pipe(image=images.to(self.dtype), prompt_embeds=cond.embeds.to(self.dtype),
                            negative_prompt_embeds=negative.expand(n).embeds.to(self.dtype),
                            generator=list(generators), output_type='pt').images
            return out.to(torch.float32)
        pixels = ((images + 1) / 2).clamp(0, 1)  # this pipeline takes tensors in [0, 1]
        out = self.pipe(prompt=list(prompts), image=pixels.to(self.dtype), negative_prompt=[negative_prompt] * n,
                        generator=list(generators), output_type='pt').images
        return out.to(torch.float32) * 2 - 1  # this pipeline's 'pt' output lies in [0, 1]
