"""A `diffusers:` model spec: where the model is, which family it belongs to, and whether two models can be
a main network and its guide, all read from the configuration files before any network is built.

`diffusers:PATH_OR_ID[#SUBFOLDER]` names a pipeline folder written by diffusers' `save_pretrained` (the
file `model_index.json` and one folder per component) or a Hugging Face hub id of one. Supported
families (the pipeline class in `model_index.json`):

- DDPM family, discrete time with a cumulative product ᾱ_t: `IFPipeline` (DeepFloyd IF stage I, pixels,
  T5 text encoder) and `StableDiffusionPipeline` (latent, CLIP text encoder), predicting ε, v or the sample;
- rectified flow: `StableDiffusion3Pipeline` (SD3 / SD3.5, latent, two CLIP and one T5 text encoder).

A main network and a guide must have the same family, the same input (channels, resolution, and for a
latent model the same VAE configuration) and the same conditioning (text encoders of the same
configuration, the same conditioning widths), because the guide is fed the main model's x and prompt
embeddings. Reading the configuration needs neither diffusers nor torch.
"""

import dataclasses
import json
import os
import re
from typing import Optional

from ..errors import EDM2Error, one_line

PREFIX = 'diffusers:'
_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')


class ExternalModelError(EDM2Error):
    """A diffusers model that cannot be used as asked; the message is one line naming the model and why."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What the code needs to know about a supported pipeline class."""

    name: str         # 'if', 'sd', 'sd3'
    kind: str         # 'ddpm' (discrete ᾱ_t) or 'flow' (rectified flow, σ = t)
    denoiser: str     # the component holding the network: 'unet' or 'transformer'
    latent: bool      # decodes through the pipeline's VAE
    text_parts: tuple  # the text encoder components whose configuration must agree for a guide


FAMILIES = {
    'IFPipeline': Family('if', 'ddpm', 'unet', False, ('text_encoder',)),
    'StableDiffusionPipeline': Family('sd', 'ddpm', 'unet', True, ('text_encoder',)),
    'StableDiffusion3Pipeline': Family('sd3', 'flow', 'transformer', True,
                                       ('text_encoder', 'text_encoder_2', 'text_encoder_3')),
}
PREDICTIONS = ('epsilon', 'v_prediction', 'sample')
# Configuration entries that say where or with which version a file was written, not what it computes.
_PROVENANCE = ('_name_or_path', '_diffusers_version', 'transformers_version', 'torch_dtype', 'dtype',
               'architectures', '_commit_hash', '_use_default_values')


def is_diffusers_spec(value) -> bool:
    """Whether a --net/--gnet value names a diffusers model ('diffusers:...')."""
    return isinstance(value, str) and value.strip().startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: `source` (a local folder or a hub id) and an optional subfolder inside it."""

    source: str
    subfolder: Optional[str] = None

    def __str__(self):
        return PREFIX + self.source + (f'#{self.subfolder}' if self.subfolder else '')

    @property
    def local(self) -> bool:
        return os.path.isdir(self.source)


def parse_spec(text: str) -> ModelSpec:
    """'diffusers:PATH_OR_ID[#SUBFOLDER]' -> ModelSpec; ExternalModelError on an empty path."""
    body = text.strip()[len(PREFIX):] if is_diffusers_spec(text) else str(text).strip()
    source, _, subfolder = body.partition('#')
    if not source.strip():
        raise ExternalModelError(f'{text!r}: expected diffusers:PATH_OR_ID[#SUBFOLDER]')
    return ModelSpec(os.path.expanduser(source.strip()), subfolder.strip().strip('/') or None)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The configuration of one diffusers pipeline, as read from its files."""

    spec: ModelSpec
    pipeline: str              # the pipeline class name
    family: Family
    components: dict           # model_index.json
    denoiser: dict             # the unet/transformer config.json
    scheduler: dict            # scheduler/scheduler_config.json
    parts: dict                # text encoder and VAE configs by component name (None where absent)

    @property
    def input_shape(self) -> tuple:
        """(channels, resolution) of the x the denoiser takes."""
        return int(self.denoiser.get('in_channels', 0)), int(self.denoiser.get('sample_size', 0))


class _Reader:
    """Reads the JSON files of one model, from its folder or from the hub (never for tests)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.root = os.path.join(spec.source, spec.subfolder or '') if spec.local else None
        if self.root is None and (os.path.exists(spec.source) or not _HUB_ID.fullmatch(spec.source)):
            raise ExternalModelError(f'{spec}: no such folder (nor a hub id like org/name)')

    def json(self, *parts, required=True) -> Optional[dict]:
        name = '/'.join(parts)
        if self.root is not None:
            path = os.path.join(self.root, *parts)
            if not os.path.isfile(path):
                if required:
                    raise ExternalModelError(f'{self.spec}: not a diffusers model folder (no {name})')
                return None
        else:
            path = self._download(name, required)
            if path is None:
                return None
        try:
            with open(path, encoding='utf-8') as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise ExternalModelError(f'{self.spec}: unreadable {name} ({one_line(e)})') from None
        if not isinstance(value, dict):
            raise ExternalModelError(f'{self.spec}: {name} is not a JSON object')
        return value

    def _download(self, name, required):
        try:
            import huggingface_hub
        except ImportError:
            raise ExternalModelError(f'{self.spec}: hub ids need the diffusers extra: '
                                     'pip install -e ".[diffusers]"') from None
        folder, _, file = name.rpartition('/')
        sub = '/'.join(p for p in (self.spec.subfolder, folder) if p) or None
        try:
            return huggingface_hub.hf_hub_download(self.spec.source, file, subfolder=sub)
        except Exception as e:  # noqa: BLE001 - missing file, no network, gated repo: one line each
            if not required and type(e).__name__ == 'EntryNotFoundError':
                return None
            raise ExternalModelError(f'{self.spec}: cannot read {name} from the hub ({one_line(e)})') from None


def read_model(spec) -> ModelInfo:
    """The configuration of the model `spec` (a string or ModelSpec); ExternalModelError, one line, for a
    folder that is not a diffusers pipeline, an unsupported family or an unsupported scheduler setting."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    reader = _Reader(spec)
    index = reader.json('model_index.json')
    pipeline = str(index.get('_class_name', '?'))
    family = FAMILIES.get(pipeline)
    if family is None:
        raise ExternalModelError(f'{spec}: {pipeline} models are not supported (supported: '
                                 f'{", ".join(FAMILIES)})')
    for needed in (family.denoiser, 'scheduler') + (('vae',) if family.latent else ()):
        if not _present(index, needed):
            raise ExternalModelError(f'{spec}: the {pipeline} has no {needed} component')
    denoiser = reader.json(family.denoiser, 'config.json')
    scheduler = reader.json('scheduler', 'scheduler_config.json')
    parts = {name: reader.json(name, 'config.json') if _present(index, name) else None
             for name in family.text_parts + (('vae',) if family.latent else ())}
    info = ModelInfo(spec, pipeline, family, index, denoiser, scheduler, parts)
    _check_scheduler(info)
    return info


def _present(index, name) -> bool:
    value = index.get(name)
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None


def _check_scheduler(info: ModelInfo) -> None:
    config, name = info.scheduler, info.scheduler.get('_class_name', '?')
    if info.family.kind == 'flow':
        if name != 'FlowMatchEulerDiscreteScheduler':
            raise ExternalModelError(f'{info.spec}: a {info.pipeline} with a {name} is not supported '
                                     '(expected FlowMatchEulerDiscreteScheduler)')
        if config.get('invert_sigmas') or config.get('stochastic_sampling'):
            raise ExternalModelError(f'{info.spec}: flow-matching schedulers with invert_sigmas or '
                                     'stochastic_sampling are not supported')
        return
    prediction = config.get('prediction_type', 'epsilon')
    if prediction not in PREDICTIONS:
        raise ExternalModelError(f'{info.spec}: prediction_type {prediction!r} is not supported '
                                 f'(supported: {", ".join(PREDICTIONS)})')
    if config.get('rescale_betas_zero_snr'):
        raise ExternalModelError(f'{info.spec}: rescale_betas_zero_snr gives sigma_max = inf at the last '
                                 'timestep; such schedules are not supported')


def _essence(config: Optional[dict]) -> Optional[dict]:
    if config is None:
        return None
    return {k: v for k, v in config.items() if k not in _PROVENANCE}


def _conditioning(info: ModelInfo) -> dict:
    """The widths of what the denoiser is fed besides x (its own projections of them may differ: IF-I-M and
    IF-I-XL project the same T5 embeddings to different widths)."""
    config = info.denoiser
    if info.family.denoiser == 'unet':
        return {'text embedding width': config.get('encoder_hid_dim') or config.get('cross_attention_dim')}
    return {'text embedding width': config.get('joint_attention_dim'),
            'pooled embedding width': config.get('pooled_projection_dim')}


def check_guide(main: ModelInfo, guide: ModelInfo) -> None:
    """Raise ExternalModelError (one line naming what differs) unless `guide` can guide `main`: the same
    family, input shape, latent space and conditioning."""
    if main.family != guide.family:
        raise ExternalModelError(f'{guide.spec} is a {guide.pipeline} but the main model is a {main.pipeline}; '
                                 'a guide must be of the same family')
    if main.input_shape != guide.input_shape:
        raise ExternalModelError(f'{guide.spec} takes input of (channels, resolution) {guide.input_shape} but '
                                 f'the main model takes {main.input_shape}')
    if main.family.latent and _essence(main.parts.get('vae')) != _essence(guide.parts.get('vae')):
        raise ExternalModelError(f'{guide.spec}: its VAE differs from the main model\'s (another latent space)')
    ours, theirs = _conditioning(main), _conditioning(guide)
    for key in ours:
        if ours[key] != theirs[key]:
            raise ExternalModelError(f'{guide.spec} takes a {key} of {theirs[key]} but the main model '
                                     f'{ours[key]} (the guide is fed the main model\'s prompt embeddings)')
    for name in main.family.text_parts:  # a guide saved without its text encoders is fine
        if guide.parts.get(name) is not None and _essence(main.parts.get(name)) != _essence(guide.parts[name]):
            raise ExternalModelError(f'{guide.spec}: its {name} differs from the main model\'s (the guide is '
                                     'fed the main model\'s prompt embeddings)')


STAGES = ('IFSuperResolutionPipeline', 'StableDiffusionUpscalePipeline')


def read_stage(spec) -> tuple:
    """(ModelSpec, pipeline class) of a super-resolution stage (IF stage II, the x4 upscaler); one-line
    ExternalModelError for anything else."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    pipeline = str(_Reader(spec).json('model_index.json').get('_class_name', '?'))
    if pipeline not in STAGES:
        raise ExternalModelError(f'{spec}: a {pipeline} is not a super-resolution stage (supported: '
                                 f'{", ".join(STAGES)})')
    return spec, pipeline
