"""The toy denoiser: an MLP of magnitude-preserving layers that predicts log p(x; sigma), whose score is
its gradient by autodiff (autoguidance paper, Appendix C), and its file format.
"""

import json
import os

import safetensors.torch
import torch

from edm2 import mp
from edm2.fileio import save_safetensors
from edm2.toy.mixture import ToyError
from edm2 import jsontext

SIGMA_DATA = 0.5


class ToyModel(torch.nn.Module):
    """MLP of magnitude-preserving linear layers that predicts log p(x; sigma).

    Input [x / sqrt(sigma_data^2 + sigma^2), ln(sigma) / 4, 1]; one input layer, then `layers` times
    [mp_silu, linear]; y = the last layer's output. log p = g mean(y^2) / sigma - |x_in|^2 / 2 with a
    learned gain g initialised to 0 (so an untrained model is the Gaussian N(0, sigma_data^2 + sigma^2)).
    The score is the gradient of log p by autodiff.
    """

    def __init__(self, width=64, layers=4, sigma_data=SIGMA_DATA):
        super().__init__()
        if int(width) < 1 or int(layers) < 1:
            raise ToyError(f'width and layers must be positive, got width={width}, layers={layers}')
        self.init_kwargs = dict(width=int(width), layers=int(layers), sigma_data=float(sigma_data))
        self.sigma_data = float(sigma_data)
        self.layers = torch.nn.ModuleList([mp.MPConv(4, width, [])] +
                                          [mp.MPConv(width, width, []) for _ in range(layers)])
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def logp(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x)).reshape(-1, 1)
        x_in = x / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        y = torch.cat([x_in, sigma.log() / 4, torch.ones_like(sigma)], dim=1)
        y = self.layers[0](y)
        for layer in self.layers[1:]:
            y = layer(mp.mp_silu(y))
        return self.gain * y.square().mean(1) / sigma[:, 0] - 0.5 * x_in.square().sum(1)

    def score(self, x, sigma, create_graph=False):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logp = self.logp(x, sigma)
            return torch.autograd.grad(logp.sum(), x, create_graph=create_graph)[0]

    def forward(self, x, sigma):
        return self.score(x, sigma)


def from_release_state_dict(state_dict):
    """Our state dict from the release's toy model's: its linear layers sit at the even indices of one
    sequence (layers.0, 2, 4, ... with the activations between them), ours at consecutive indices."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith('layers.'):
            _, index, rest = key.split('.', 2)
            key = f'layers.{int(index) // 2}.{rest}'
        out[key] = value
    return out


def release_model(state_dict):
    """A ToyModel (eval mode) holding the weights of the release's toy model `state_dict`."""
    ours = from_release_state_dict(state_dict)
    width, _ = ours['layers.0.weight'].shape
    net = ToyModel(width, sum(k.startswith('layers.') for k in ours) - 1)
    net.load_state_dict(ours)
    return net.eval().requires_grad_(False)


class ToyModelError(ToyError):
    """A toy model file is missing or is not one written by `save_model` (one-line message)."""


def save_model(path, net, **metadata):
    """Write net's weights and constructor arguments (safetensors + JSON metadata), atomically."""
    path = os.fspath(path)
    meta = {'format': 'edm2-toy-v1', 'init_kwargs': jsontext.dumps(net.init_kwargs),
            'metadata': jsontext.dumps(metadata)}
    tensors = {k: v.detach().to('cpu', torch.float32).contiguous() for k, v in net.state_dict().items()}
    save_safetensors(path, tensors, metadata=meta)


def load_release_pickle(path):
    """A ToyModel from a pickle in the release's persistent-class format, read as data (edm2.safe_pickle: the
    embedded source is never run): the first module in it whose tensors are the release's toy model's
    (layers.{0,2,...}.weight and gain). A pickle that needs any other class to unpickle is refused."""
    from edm2 import published, safe_pickle
    try:
        with open(path, 'rb') as f:
            data = safe_pickle.load(f, tensors=True)
    except (OSError, safe_pickle.UnsafePickleError) as e:
        raise ToyModelError(f'{path}: cannot read the pickle: {e}') from None
    todo = [data]
    while todo:
        item = todo.pop(0)
        if isinstance(item, dict):
            todo += list(item.values())
        elif isinstance(item, (list, tuple)):
            todo += list(item)
        elif isinstance(item, safe_pickle.PersistentRecord):
            tensors = {}
            try:
                published.collect_tensors(item, '', tensors, path)
            except published.PublishedSnapshotError:
                continue
            if 'gain' in tensors and 'layers.0.weight' in tensors:
                try:
                    return release_model({k: v.float() for k, v in tensors.items()})
                except (RuntimeError, KeyError, ValueError) as e:
                    raise ToyModelError(f'{path}: toy model tensors of unexpected shapes ({e})') from None
    raise ToyModelError(f'{path}: no toy model (tensors layers.N.weight and gain) in this pickle')


def load_model(path, device='cpu'):
    """(ToyModel in eval mode, metadata dict) from a file written by `save_model`, or from a release-format
    pickle (`load_release_pickle`; metadata {'format': 'release-pickle'})."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ToyModelError(f'{path}: toy model file not found (train one with `toy_example.py train`)')
    with open(path, 'rb') as f:
        head = f.read(2)
    if head[:1] == b'\x80' and len(head) == 2 and 2 <= head[1] <= 5:
        return load_release_pickle(path).to(device), {'format': 'release-pickle'}
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get('format') != 'edm2-toy-v1':
            raise ValueError('not a toy model')
        net = ToyModel(**json.loads(meta['init_kwargs']))
        net.load_state_dict(tensors)
        metadata = json.loads(meta.get('metadata', '{}'))
    except Exception as e:
        raise ToyModelError(f'{path}: not a toy model written by `toy_example.py train` ({type(e).__name__})') from None
    return net.to(device).eval().requires_grad_(False), metadata
