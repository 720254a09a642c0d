"""Encoders of the EDM2 paper's pixel-space and latent-space (Stable Diffusion VAE) models: RGB scaling, the VAE latent pipeline, specs."""

import sys

import numpy as np
import pytest
from helpers import _tiny_autoencoder
import torch

from edm2 import encoders
from edm2.encoders import EncoderError, StabilityVAEEncoder, StandardRGBEncoder


pytestmark = pytest.mark.usefixtures('one_thread')


def test_rgb_encode_decode_exact():
    enc = StandardRGBEncoder()
    v = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    x = enc.encode(v)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    torch.testing.assert_close(x, v.float() / 127.5 - 1)
    # decode = uint8(clip(x * 127.5 + 128)) truncates, so it inverts encode for every value.
    assert torch.equal(enc.decode(x), v)
    assert torch.equal(enc.decode(torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])),
                       torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8))
    assert torch.equal(enc.encode(np.full([3, 2, 2], 255, np.uint8)), torch.ones(3, 2, 2))  # numpy dataset items
    assert encoders.from_spec(enc.spec()).spec() == {'class': 'StandardRGBEncoder'}


def test_vae_scale_and_bias_defaults():
    enc = StabilityVAEEncoder()
    raw_mean = np.float32([5.81, 3.25, 0.12, -2.15])
    raw_std = np.float32([4.17, 4.62, 3.71, 3.28])
    np.testing.assert_allclose(enc.scale, 0.5 / raw_std, rtol=1e-7)
    np.testing.assert_allclose(enc.bias, -raw_mean * 0.5 / raw_std, rtol=1e-6)
    spec = enc.spec()
    assert spec['vae_name'] == 'stabilityai/sd-vae-ft-mse' and spec['batch_size'] == 8
    again = encoders.from_spec(spec)
    assert np.array_equal(again.scale, enc.scale) and np.array_equal(again.bias, enc.bias)
    with pytest.raises(EncoderError, match='Nope'):
        encoders.from_spec({'class': 'Nope'})
    with pytest.raises(EncoderError, match='colour'):
        encoders.from_spec({'class': 'StabilityVAEEncoder', 'colour': 1})


def test_encode_latents_samples_and_scales():
    enc = StabilityVAEEncoder()
    torch.manual_seed(0)
    mean = torch.randn(2, 4, 8, 8) * 3
    raw = torch.cat([mean, torch.zeros_like(mean)], dim=1)  # zero std: deterministic
    scale = torch.as_tensor(enc.scale).reshape(1, 4, 1, 1)
    bias = torch.as_tensor(enc.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(enc.encode_latents(raw), mean * scale + bias)
    torch.testing.assert_close(enc.encode(raw), mean * scale + bias)  # float input = raw latents
    # With std > 0, the sample is mean + std * eps: its spread is std * scale.
    raw = torch.cat([torch.zeros(1, 4, 64, 64), torch.full([1, 4, 64, 64], 2.0)], dim=1)
    g = torch.Generator().manual_seed(1)
    y = enc.encode_latents(raw, generator=g)
    eps = torch.randn([1, 4, 64, 64], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, 2 * eps * scale + bias)


class _FakeVAE(torch.nn.Module):
    """Records what the encoder feeds the VAE; 'decodes' to values outside [0, 1]."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros([]))

    def encode(self, x):
        self.seen = x

        class Dist:
            mean = x[:, :1, ::8, ::8].repeat(1, 4, 1, 1)
            std = torch.full_like(mean, 0.25)
        return {'latent_dist': Dist()}

    def decode(self, z):
        self.decoded = z
        return {'sample': z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3) * 2 - 0.5}


def test_vae_pipeline_conventions():
    vae = _FakeVAE()
    enc = StabilityVAEEncoder(vae=vae, batch_size=3)
    enc.init('cpu')
    pixels = torch.randint(0, 256, [5, 3, 16, 16], dtype=torch.uint8)
    raw = enc.encode_pixels(pixels)
    assert raw.shape == (5, 8, 2, 2)
    torch.testing.assert_close(vae.seen, pixels[3:].float() / 255)  # pixels / 255, in batches of 3
    assert torch.equal(raw[:, 4:], torch.full([5, 4, 2, 2], 0.25))  # mean || std
    z = torch.randn(5, 4, 2, 2)
    out = enc.decode(z)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 16, 16)
    scale = torch.as_tensor(enc.scale).reshape(1, 4, 1, 1)
    bias = torch.as_tensor(enc.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(vae.decoded, ((z - bias) / scale)[3:])  # the VAE gets unscaled latents
    y = ((z - bias) / scale)[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3) * 2 - 0.5
    assert torch.equal(out, (y.clamp(0, 1) * 255).to(torch.uint8))


@pytest.mark.slow  # importing diffusers alone takes seconds
def test_vae_with_a_tiny_diffusers_autoencoder(tmp_path):
    vae = _tiny_autoencoder()
    enc = StabilityVAEEncoder(vae=vae, batch_size=2)
    enc.init('cpu')
    pixels = torch.randint(0, 256, [3, 3, 32, 32], dtype=torch.uint8)
    raw = enc.encode_pixels(pixels)
    assert raw.shape == (3, 8, 4, 4) and (raw[:, 4:] > 0).all()  # 1/8 resolution, mean || positive std
    with torch.no_grad():
        dist = vae.encode(pixels.float() / 255)['latent_dist']
    torch.testing.assert_close(raw, torch.cat([dist.mean, dist.std], dim=1), rtol=1e-5, atol=1e-6)
    latents = enc.encode(pixels)
    assert latents.shape == (3, 4, 4, 4)
    images = enc.decode(latents)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    # A local folder as vae_name loads the same weights.
    vae.save_pretrained(tmp_path / 'vae')
    from_folder = StabilityVAEEncoder(vae_name=str(tmp_path / 'vae'))
    from_folder.init('cpu')
    torch.testing.assert_close(from_folder.encode_pixels(pixels), raw)


def test_vae_without_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)  # import diffusers -> ImportError
    enc = StabilityVAEEncoder()
    with pytest.raises(EncoderError, match=r'pip install \.\[vae\]'):
        enc.init('cpu')


@pytest.mark.slow
def test_vae_bad_folder_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip('diffusers')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # never try the network for a name that is not a folder
    enc = StabilityVAEEncoder(vae_name=str(tmp_path / 'no-such-vae'))
    with pytest.raises(EncoderError, match='no-such-vae') as e:
        enc.init('cpu')
    assert '\n' not in str(e.value)
