"""The FID feature network: Inception-v3 as in the TensorFlow graph of 2015-12-05, the network of FID
(Heusel et al., NeurIPS 2017) and of the ADM evaluator (Dhariwal & Nichol, NeurIPS 2021).

Published FIDs were computed with that graph; to reproduce them a PyTorch version must keep its
quirks, each marked below: TF1 bilinear resizing to 299x299, (x - 128) / 128 input scaling,
batch-norm eps 0.001 and bias-free convolutions, average pools that ignore padding, a max-pool in the
last mixed block and a 1008-way classifier. Module and parameter names follow the published weight
file `pt_inception-2015-12-05-6726825d.pth`, so its state dict loads as is.

Channel widths are the published ones divided by `width_divisor` (1 for the real network), which is
inferred from the state dict: tests and benchmarks can use tiny stand-ins of the same architecture.
"""

import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 299  # the graph's fixed input size
FEATURE_DIM = 2048  # pool features (at width_divisor 1)
NUM_CLASSES = 1008  # the 2015 graph's classifier has 1008 outputs (1000 classes + unused)
SFID_CHANNELS = 7  # sFID keeps channels 0-6 of the Mixed_6d.branch1x1 output (Nash et al. 2021; ADM evaluator)
SFID_DIM = 17 * 17 * SFID_CHANNELS  # 2023: the 17x17 grid of the 299x299 input
OUTPUTS = ('pool', 'logits', 'spatial')  # what `InceptionV3FID.outputs` can return in one pass


def sfid_features(branch1x1: torch.Tensor) -> torch.Tensor:
    """sFID features from the Mixed_6d.branch1x1 activations [N, C, 17, 17]: channels 0-6, flattened in
    (H, W, C) order -> [N, 2023].

    The TensorFlow graph (where the layer is `mixed_6/conv`) holds activations as NHWC, and the sFID
    reference statistics were computed on its row-major flattening: height, then width, then channel.
    Flattening NCHW directly would give the same numbers in another order, and wrong statistics.
    """
    if branch1x1.ndim != 4 or branch1x1.shape[1] < SFID_CHANNELS:
        raise ValueError(f'expected Mixed_6d.branch1x1 activations [N, >={SFID_CHANNELS}, H, W], '
                         f'got {list(branch1x1.shape)}')
    return branch1x1[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(branch1x1.shape[0], -1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] float images as TensorFlow 1 `resize_bilinear` does it.

    align_corners=False and *no* half-pixel offset: destination index i reads source coordinate
    i * in / out, interpolating between floor and floor + 1 (clamped to the last pixel). This is not
    what torch's `interpolate(..., align_corners=False)` computes, and the difference moves FIDs.
    Coordinates are computed in float32, as the TF graph does.
    """
    def axis(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(
            n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo.to(torch.float32)).to(x.dtype)
        return lo, hi, frac

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    ylo, yhi, dy = axis(h)
    xlo, xhi, dx = axis(w)
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    rows = top + (bottom - top) * dy[:, None]
    left, right = rows[:, :, :, xlo], rows[:, :, :, xhi]
    return left + (right - left) * dx


class BasicConv2d(nn.Module):
    """Convolution without bias + batch norm (eps 0.001, TF's default) + ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TF's 'SAME' average pooling divides by the number of real (non-padding) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 mixed block (Mixed_5b/5c/5d)."""

    def __init__(self, cin, pool_features, d):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64 // d, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48 // d, 1)
        self.branch5x5_2 = BasicConv2d(48 // d, 64 // d, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64 // d, 1)
        self.branch3x3dbl_2 = BasicConv2d(64 // d, 96 // d, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96 // d, 96 // d, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, cin, d):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384 // d, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64 // d, 1)
        self.branch3x3dbl_2 = BasicConv2d(64 // d, 96 // d, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96 // d, 96 // d, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 mixed block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin, c7, d):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192 // d, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192 // d, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192 // d, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192 // d, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin, d):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192 // d, 1)
        self.branch3x3_2 = BasicConv2d(192 // d, 320 // d, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192 // d, 1)
        self.branch7x7x3_2 = BasicConv2d(192 // d, 192 // d, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192 // d, 192 // d, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192 // d, 192 // d, 3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            b7,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8x8 mixed block with split 1x3 / 3x1 branches (Mixed_7b, Mixed_7c).

    The 2015 graph pools differently in the two blocks: Mixed_7b averages (ignoring padding), Mixed_7c
    takes a 3x3 max (the graph's pool_2 vs mixed_10) -- `pool` selects which.
    """

    def __init__(self, cin, d, pool):
        super().__init__()
        assert pool in ('avg', 'max')
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320 // d, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384 // d, 1)
        self.branch3x3_2a = BasicConv2d(384 // d, 384 // d, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384 // d, 384 // d, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448 // d, 1)
        self.branch3x3dbl_2 = BasicConv2d(448 // d, 384 // d, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384 // d, 384 // d, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384 // d, 384 // d, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192 // d, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        if self.pool == 'avg':
            bp = _avg_pool_3x3(x)
        else:
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(bp)], dim=1)


class InceptionV3FID(nn.Module):
    """uint8-range images [N, 3, H, W] (any size) -> 2048-d pool features (and unbiased logits).

    forward(x) returns the pool features; `outputs(x, names)` returns any of pool features, classifier
    output without its bias (fc.weight only; the Inception Score's logits) and sFID features from one pass.
    """

    def __init__(self, width_divisor=1):
        super().__init__()
        d = int(width_divisor)
        if d < 1 or any(c % d for c in (32, 48, 64, 80, 96, 160, 192, 320, 384, 448)):
            raise ValueError(f'width_divisor must divide every Inception width (e.g. 1, 2, 4, 8, 16), got {d}')
        self.width_divisor = d
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32 // d, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32 // d, 32 // d, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32 // d, 64 // d, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64 // d, 80 // d, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80 // d, 192 // d, 3)
        self.Mixed_5b = InceptionA(192 // d, 32 // d, d)
        self.Mixed_5c = InceptionA(256 // d, 64 // d, d)
        self.Mixed_5d = InceptionA(288 // d, 64 // d, d)
        self.Mixed_6a = InceptionB(288 // d, d)
        self.Mixed_6b = InceptionC(768 // d, 128 // d, d)
        self.Mixed_6c = InceptionC(768 // d, 160 // d, d)
        self.Mixed_6d = InceptionC(768 // d, 160 // d, d)
        self.Mixed_6e = InceptionC(768 // d, 192 // d, d)
        self.Mixed_7a = InceptionD(768 // d, d)
        self.Mixed_7b = InceptionE(1280 // d, d, pool='avg')
        self.Mixed_7c = InceptionE(2048 // d, d, pool='max')
        self.feature_dim = FEATURE_DIM // d
        self.fc = nn.Linear(self.feature_dim, NUM_CLASSES)
        self.eval()

    @classmethod
    def from_state_dict(cls, state_dict):
        """Build the network whose widths match `state_dict` and load it (strictly)."""
        w = state_dict.get('Conv2d_1a_3x3.conv.weight')
        if w is None or w.ndim != 4 or w.shape[0] < 1 or 32 % w.shape[0]:
            raise ValueError('not an Inception-v3 FID state dict (no usable Conv2d_1a_3x3.conv.weight)')
        net = cls(width_divisor=32 // w.shape[0])
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
        # BN step counters are unused at inference; files written by older torch versions lack them.
        missing = [k for k in missing if not k.endswith('num_batches_tracked')]
        if missing or unexpected:
            raise ValueError(f'Inception-v3 state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}')
        return net

    def outputs(self, x, names=('pool',)) -> dict:
        """The requested outputs of one forward pass, as {name: float32 tensor}:

            pool     2048-d pool features (FID, precision/recall)
            logits   1008 classifier outputs without the bias, pool @ fc.weight.T (Inception Score)
            spatial  2023-d sFID features of Mixed_6d.branch1x1 (see `sfid_features`)
        """
        unknown = set(names) - set(OUTPUTS)
        if unknown:
            raise ValueError(f'unknown Inception outputs {sorted(unknown)}; choose from {", ".join(OUTPUTS)}')
        x = resize_bilinear_tf1(x.to(torch.float32), RESOLUTION)
        x = (x - 128) / 128  # the graph's input scaling of [0, 255] pixels
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        out = {}
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
            if block is self.Mixed_6d and 'spatial' in names:
                # The block concatenates its branches with branch1x1 first: its channels are that output.
                out['spatial'] = sfid_features(x[:, :self.Mixed_6d.branch1x1.conv.out_channels])
        features = x.mean(dim=(2, 3))
        out['pool'] = features
        if 'logits' in names:
            out['logits'] = features @ self.fc.weight.T
        return {name: out[name] for name in names}

    def features_and_logits(self, x):
        """(pool features, unbiased logits) of one pass."""
        out = self.outputs(x, ('pool', 'logits'))
        return out['pool'], out['logits']

    def forward(self, x):
        return self.outputs(x, ('pool',))['pool']
