"""Feature detectors for the metrics: where their weight files come from, and uint8 images -> features.

A weight file is found, in this order: the path given explicitly (`--inception-weights`,
`--dinov2-weights`), the environment variable (`EDM2_INCEPTION_WEIGHTS`, `EDM2_DINOV2_WEIGHTS`), the
detector cache folder (`$EDM2_CACHE_DIR/detectors` or `~/.cache/edm2/detectors`), torch.hub's checkpoint
folder (where pytorch-fid and torch-fidelity keep the same files), and finally a download of the
published URL into the cache folder (with the sha256 prefix in the file name checked). Files are
opened with `torch.load(weights_only=True)`: plain tensors only, never code.
"""

import functools
import hashlib
import os
import pathlib

import torch

from edm2.download import cache_root, fetch
from edm2.errors import EDM2Error
from edm2.safe_pickle import UnsafePickleError, load_tensor_archive

from . import dinov2 as _dinov2
from . import inception as _inception


class DetectorError(EDM2Error):
    """A detector's weights cannot be found or used; the message is one line for users."""


SPECS = {
    'inception': dict(
        title='Inception-v3 (FID)',
        url='https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth',
        file_name='pt_inception-2015-12-05-6726825d.pth',
        sha256_prefix='6726825d',
        other_names=('weights-inception-2015-12-05-6726825d.pth',),  # torch-fidelity's name for the same file
        env='EDM2_INCEPTION_WEIGHTS',
        flag='--inception-weights',
    ),
    'dinov2': dict(
        title='DINOv2 ViT-L/14 (FD_DINOv2)',
        url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth',
        file_name='dinov2_vitl14_pretrain.pth',
        sha256_prefix=None,  # the published name carries no hash
        env='EDM2_DINOV2_WEIGHTS',
        flag='--dinov2-weights',
    ),
}


def cache_dir() -> pathlib.Path:
    """Folder where detector weights are looked for and downloaded to."""
    return cache_root() / 'detectors'


def _torch_hub_file(file_name):
    try:
        return pathlib.Path(torch.hub.get_dir()) / 'checkpoints' / file_name
    except Exception:  # pragma: no cover - torch.hub unavailable
        return None


def find_weights(name, path=None, download=True) -> pathlib.Path:
    """Local path of detector `name`'s weight file (see the module docstring for the search order)."""
    spec = SPECS[name]
    where = f'{spec["flag"]} PATH, {spec["env"]}=PATH, or {cache_dir() / spec["file_name"]}'
    for given, source in ((path, spec['flag']), (os.environ.get(spec['env']), spec['env'])):
        if given:
            p = pathlib.Path(given).expanduser()
            if not p.is_file():
                raise DetectorError(f'{spec["title"]} weights not found: {p} (given by {source}); '
                                    f'download {spec["url"]}')
            return p
    names = (spec['file_name'],) + tuple(spec.get('other_names', ()))
    candidates = [cache_dir() / n for n in names] + [_torch_hub_file(n) for n in names]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    if not download:
        raise DetectorError(f'{spec["title"]} weights not found; put {spec["url"]} at {where}')
    try:
        return pathlib.Path(fetch(spec['url'], cache_dir=str(cache_dir()), sha256_prefix=spec['sha256_prefix']))
    except Exception as e:  # offline, refused, wrong hash, missing module: all end the same way for users
        reason = getattr(e, 'reason', None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise DetectorError(f'{spec["title"]} weights unavailable ({reason}); download {spec["url"]} '
                            f'and pass {where}') from None


@functools.lru_cache(maxsize=None)
def _sha256(path, size, mtime):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path) -> str:
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def load_state_dict(path, title='detector'):
    """Tensors of a plain state-dict file, read with weights_only=True (no code is ever run)."""
    path = pathlib.Path(path)
    if path.suffix == '.pkl':
        raise DetectorError(f'{path}: pickled detectors (e.g. NVIDIA\'s inception-2015-12-05.pkl) embed code and '
                            f'are not loaded; use the plain state dict .pth file instead')
    try:
        sd = load_tensor_archive(path)
    except UnsafePickleError as e:
        raise DetectorError(f'cannot read {title} weights {path}: {e}') from None
    if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DetectorError(f'{path} is not a state dict of tensors ({title} weights expected)')
    return sd


class Detector:
    """uint8-range images [N, C, H, W] (C = 1 or 3, any size) -> float32 features [N, feature_dim].

    `outputs(images, names)` returns several outputs of one forward pass: 'pool' (the features) for
    every detector, and for Inception also 'logits' (Inception Score) and 'spatial' (sFID); see
    `output_dims`.
    """

    def __init__(self, name, net, weights_path, device, resize_mode='torch'):
        self.name = name
        self.net = net.to(device).eval().requires_grad_(False)
        self.weights_path = pathlib.Path(weights_path)
        self.device = torch.device(device)
        self.resize_mode = resize_mode
        self.feature_dim = net.feature_dim
        self.output_dims = {'pool': self.feature_dim}
        if name == 'inception':
            self.output_dims.update(logits=_inception.NUM_CLASSES, spatial=_inception.SFID_DIM)

    @property
    def weights_sha256(self) -> str:
        return file_sha256(self.weights_path)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images, ('pool',))['pool']

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, names=('pool',)) -> dict:
        """{name: float32 [N, output_dims[name]]} for the requested `names`, from one forward pass."""
        unknown = [n for n in names if n not in self.output_dims]
        if unknown:
            raise DetectorError(f'the {self.name} detector has no output {unknown[0]!r} '
                                f'(it has: {", ".join(self.output_dims)})')
        # Full float32: TF32 convolutions (cuDNN's default on recent GPUs) would shift the features
        # by ~1e-3 relative and the published FIDs with them.
        cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return self._outputs(images, tuple(names))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32

    def _outputs(self, images, names):
        x = images.to(self.device)
        if x.shape[1] == 1:  # grayscale datasets: the detectors expect RGB
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise DetectorError(f'{self.name} detector expects 1- or 3-channel images, got {x.shape[1]} channels')
        if self.name == 'dinov2':
            x = _dinov2.preprocess(x, self.resize_mode)
            return {'pool': self.net(x.to(torch.float32)).to(torch.float32)}
        out = self.net.outputs(x.to(torch.float32), names)
        return {k: v.to(torch.float32) for k, v in out.items()}


def load_detector(name, weights=None, device='cpu', resize_mode='torch', num_heads=None) -> Detector:
    """Detector `name` ('inception' or 'dinov2') with its weights found by `find_weights(name, weights)`.

    resize_mode (DINOv2 only): 'torch' (bicubic antialiased, fast) or 'pil' (exact, slow).
    num_heads (DINOv2 only): attention heads; default width / 64 as in every published DINOv2.
    """
    if name not in SPECS:
        raise DetectorError(f'unknown detector {name!r}; choose one of: {", ".join(SPECS)}')
    path = find_weights(name, weights)
    sd = load_state_dict(path, SPECS[name]['title'])
    try:
        if name == 'inception':
            net = _inception.InceptionV3FID.from_state_dict(sd)
        else:
            net = _dinov2.DINOv2ViT.from_state_dict(sd, num_heads=num_heads)
    except (ValueError, RuntimeError, KeyError) as e:
        reason = ' '.join(str(e).split())[:300] or type(e).__name__  # torch's messages span several lines
        raise DetectorError(f'{path} does not hold {SPECS[name]["title"]} weights: {reason}') from None
    return Detector(name, net, path, device, resize_mode=resize_mode)


def random_state_dict(name, seed=0, **sizes) -> dict:
    """Random weights of detector `name` with sensible scales (non-degenerate features), for tests and
    benchmarks. sizes: `width_divisor` (Inception) or embed_dim / depth / num_heads / grid_size (DINOv2)."""
    g = torch.Generator().manual_seed(seed)
    if name == 'inception':
        net = _inception.InceptionV3FID(**sizes)
    elif name == 'dinov2':
        net = _dinov2.DINOv2ViT(**sizes)
    else:
        raise DetectorError(f'unknown detector {name!r}; choose one of: {", ".join(SPECS)}')
    sd = {}
    for key, v in net.state_dict().items():
        if v.dtype == torch.int64:  # BN num_batches_tracked
            sd[key] = torch.zeros_like(v)
        elif key.endswith('running_var'):
            sd[key] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif key.endswith('running_mean') or key.endswith('bias'):
            sd[key] = 0.1 * torch.randn(v.shape, generator=g)
        elif key.endswith('bn.weight') or key.startswith('norm') or '.norm' in key or key.endswith('gamma'):
            sd[key] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim >= 2 and key not in ('pos_embed', 'cls_token', 'mask_token'):
            fan_in = v[0].numel()
            sd[key] = torch.randn(v.shape, generator=g) * (2 / fan_in) ** 0.5  # He init keeps ReLU features alive
        else:
            sd[key] = torch.randn(v.shape, generator=g)
    return sd
