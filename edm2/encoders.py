"""Encoders between dataset items and network inputs: pixels for ImageNet-64 models, Stable Diffusion VAE
latents for ImageNet-512 models (the latent set-up of the EDM2 paper's ImageNet-512 experiments).

- StandardRGBEncoder: uint8 pixels <-> [-1, 1] (ImageNet-64 models).
- StabilityVAEEncoder: uint8 pixels -> 8-channel raw VAE latents (posterior mean || std, 1/8
  resolution) -> sampled and scaled 4-channel latents (ImageNet-512 models), and back to pixels
  through the VAE decoder. Needs diffusers (`pip install .[vae]`), imported only when used.

Every encoder has `spec()` (a JSON-serialisable dict) and `from_spec(spec)` rebuilds it; the native
checkpoint format stores the spec.

The VAE a file names (a Hugging Face id, `stabilityai/sd-vae-ft-mse` in the published snapshots) can be
replaced by a local folder: $EDM2_VAE (set by the commands' `--vae PATH`) wins over the file's name.
Offline, loading fails in one line naming the model and the flag, without the Hugging Face hub's retries.
"""

import contextlib
import os
import warnings

import numpy as np
import torch

__all__ = ['StandardRGBEncoder', 'StabilityVAEEncoder', 'from_spec', 'EncoderError', 'load_vae', 'VAE_ENV']

VAE_ENV = 'EDM2_VAE'


class EncoderError(ValueError):
    """One-line user-facing error (missing extra, bad spec, bad input)."""


def _as_tensor(x, device=None):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return torch.as_tensor(x, device=device)


class StandardRGBEncoder:
    """Pixels are the network input: uint8 [0, 255] <-> float [-1, 1]."""

    def __init__(self):
        pass

    def spec(self):
        return {'class': 'StandardRGBEncoder'}

    def init(self, device):  # nothing to load
        pass

    def __repr__(self):
        return 'StandardRGBEncoder()'

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        return _as_tensor(x)  # the raw dataset form of an RGB dataset is the pixels themselves

    def encode_latents(self, x):
        return _as_tensor(x).to(torch.float32) / 127.5 - 1

    def decode(self, x):
        # Truncation (not rounding) after +128, as the published release decodes its images.
        return (_as_tensor(x).to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


class StabilityVAEEncoder:
    """Latent-space encoder around the Stable Diffusion VAE (AutoencoderKL).

    scale = final_std / raw_std and bias = final_mean - raw_mean * scale map the raw posterior samples
    to roughly N(final_mean, final_std^2) per channel. `vae_name` is a Hugging Face id or a local
    folder written by `AutoencoderKL.save_pretrained`; `vae` may pass a ready AutoencoderKL instead.
    `scale` / `bias` (sequences of 4) override the ones computed from raw_mean/raw_std (as stored
    in published snapshots).
    """

    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8,
                 scale=None, bias=None, vae=None):
        self.vae_name = vae_name
        self.batch_size = int(batch_size)
        if scale is None:
            scale = np.float32(final_std) / np.float32(raw_std)
        if bias is None:
            bias = np.float32(final_mean) - np.float32(raw_mean) * np.float32(scale)
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        self.bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if self.scale.shape != self.bias.shape:
            raise EncoderError(f'StabilityVAEEncoder: scale {self.scale.shape} and bias {self.bias.shape} differ in size')
        self._vae = vae

    def spec(self):
        return {'class': 'StabilityVAEEncoder', 'vae_name': self.vae_name, 'batch_size': self.batch_size,
                'scale': [float(v) for v in self.scale], 'bias': [float(v) for v in self.bias]}

    def __repr__(self):
        return f'StabilityVAEEncoder(vae_name={self.vae_name!r})'

    def init(self, device):
        """Load the VAE (once) and move it to `device`."""
        if self._vae is None:
            self._vae = load_vae(os.environ.get(VAE_ENV) or self.vae_name)
        self._vae.eval().requires_grad_(False).to(device)

    def _device(self):
        return next(self._vae.parameters()).device

    def _affine(self, x):
        scale = torch.as_tensor(self.scale, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.as_tensor(self.bias, device=x.device).reshape(1, -1, 1, 1)
        return scale, bias

    def encode(self, x, generator=None):
        """uint8 pixels [N,3,H,W] or raw float latents [N,8,h,w] -> network input [N,4,h,w]."""
        x = _as_tensor(x)
        if x.dtype == torch.uint8:
            x = self.encode_pixels(x)
        return self.encode_latents(x, generator=generator)

    @torch.no_grad()
    def encode_pixels(self, x):
        """uint8 pixels [N,3,H,W] -> raw latents [N,8,H/8,W/8] = posterior mean || std."""
        if self._vae is None:
            self.init(torch.device('cpu'))
        device = self._device()
        x = _as_tensor(x)
        out = []
        for chunk in x.split(self.batch_size):
            # The VAE is fed pixels / 255 in [0, 1], the range the Stable Diffusion VAE was trained on.
            dist = self._vae.encode(chunk.to(device, torch.float32) / 255)['latent_dist']
            out.append(torch.cat([dist.mean, dist.std], dim=1))
        return torch.cat(out)

    def encode_latents(self, x, generator=None):
        """Raw latents [N,8,h,w] -> mean + std * eps, then scale/bias -> [N,4,h,w]."""
        x = _as_tensor(x).to(torch.float32)
        mean, std = x.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=x.device) if generator is not None \
            else torch.randn_like(mean)
        scale, bias = self._affine(x)
        return (mean + std * eps) * scale + bias

    @torch.no_grad()
    def decode(self, x):
        """Network output latents [N,4,h,w] -> uint8 pixels [N,3,8h,8w]."""
        if self._vae is None:
            self.init(_as_tensor(x).device)
        device = self._device()
        x = _as_tensor(x).to(device, torch.float32)
        scale, bias = self._affine(x)
        x = (x - bias) / scale
        out = []
        for chunk in x.split(self.batch_size):
            y = self._vae.decode(chunk)['sample']
            out.append(y.clamp(0, 1).mul(255).to(torch.uint8))
        return torch.cat(out)


@contextlib.contextmanager
def _quiet_hub():
    """diffusers and huggingface_hub without their warnings (accelerate, deprecations) and retry messages."""
    import diffusers
    import huggingface_hub
    levels = diffusers.utils.logging.get_verbosity(), huggingface_hub.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        huggingface_hub.utils.logging.set_verbosity(levels[1])


def _hub_reachable(name):
    """Whether the Hugging Face hub answers for `name` within 10 s (else loading would retry for a minute)."""
    import requests
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    try:
        requests.head(f'{endpoint}/{name}/resolve/main/config.json', timeout=10, allow_redirects=False)
        return True
    except requests.RequestException:
        return False


def load_vae(name):
    """A diffusers AutoencoderKL from a local folder (`save_pretrained`'s) or a Hugging Face id (the local
    Hugging Face cache first, then the hub). Raises EncoderError in one line naming the model and the
    `--vae PATH` remedy."""
    try:
        import diffusers
    except ImportError:
        raise EncoderError('StabilityVAEEncoder needs diffusers: pip install .[vae]') from None
    remedy = (f'give --vae PATH, a local AutoencoderKL folder (on a connected machine: python -c "import '
              f'diffusers; diffusers.AutoencoderKL.from_pretrained(\'{name}\').save_pretrained(\'PATH\')")')
    local = os.path.isdir(os.path.expanduser(str(name)))
    with _quiet_hub():
        if local:
            try:
                return diffusers.AutoencoderKL.from_pretrained(os.path.expanduser(str(name)), local_files_only=True)
            except Exception as e:  # noqa: BLE001 -- any loading failure becomes one line
                raise EncoderError(f'cannot load the VAE folder {name}: {_first_line(e)} (expected an AutoencoderKL '
                                   f'folder with config.json, as save_pretrained writes)') from None
        try:  # the Hugging Face cache, without a network
            return diffusers.AutoencoderKL.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001 -- not cached: try the hub
            pass
        if os.environ.get('HF_HUB_OFFLINE') == '1' or not _hub_reachable(name):
            raise EncoderError(f'cannot load the VAE {name!r}: not in the Hugging Face cache and the hub cannot be '
                               f'reached (offline?); {remedy}')
        try:
            return diffusers.AutoencoderKL.from_pretrained(name)
        except Exception as e:  # noqa: BLE001 -- any loading failure becomes one line
            raise EncoderError(f'cannot load the VAE {name!r}: {_first_line(e)}; {remedy}') from None


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def from_spec(spec):
    """Rebuild an encoder from `encoder.spec()`; None stays None."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or 'class' not in spec:
        raise EncoderError(f'encoder spec must be a dict with a "class" entry, got {spec!r}')
    kwargs = {k: v for k, v in spec.items() if k != 'class'}
    if spec['class'] == 'StandardRGBEncoder':
        return StandardRGBEncoder()
    if spec['class'] == 'StabilityVAEEncoder':
        allowed = {'vae_name', 'batch_size', 'scale', 'bias', 'raw_mean', 'raw_std', 'final_mean', 'final_std'}
        unknown = set(kwargs) - allowed
        if unknown:
            raise EncoderError(f'unknown StabilityVAEEncoder spec entries: {", ".join(sorted(unknown))}')
        return StabilityVAEEncoder(**kwargs)
    raise EncoderError(f'unknown encoder class {spec["class"]!r} (expected StandardRGBEncoder or StabilityVAEEncoder)')
