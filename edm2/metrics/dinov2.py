"""The FD_DINOv2 feature network: a DINOv2 vision transformer (Oquab et al., 2023; FD_DINOv2 as proposed by
Stein et al., NeurIPS 2023 and used by the EDM2 paper).

Attribution: the architecture and its parameter names follow the DINOv2 project (facebookresearch/dinov2,
Apache-2.0) so that its published weight files load as they are; the resize variants follow dgm-eval
(layer6ai-labs/dgm-eval, MIT). See NOTICE.

FD_DINOv2 uses `dinov2_vitl14` (patch 14, width 1024, depth 24, 16 heads): uint8 images are resized
to 224x224 (bicubic with antialiasing), scaled to [0, 1], normalised with the ImageNet mean and std,
and the feature is the class token after the final LayerNorm. Parameter names follow the published
`dinov2_vit*14_pretrain.pth` files. Width, depth, patch size, MLP width and the stored
position-embedding grid are inferred from the state dict; the number of heads is not visible in the
shapes, and every published DINOv2 model uses 64 channels per head, so that is the default.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # channels per attention head in every published DINOv2 model
INTERPOLATE_OFFSET = 0.1  # DINOv2 adds this to the target grid size when computing the scale factor


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        n, t, c = x.shape
        # qkv channels are ordered [3, heads, head_dim].
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim, num_heads, mlp_hidden, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, tokens, dim], tokens in row-major order


class DINOv2ViT(nn.Module):
    """Normalised image tensor [N, 3, H, W] (H, W multiples of the patch) -> class token [N, dim]."""

    def __init__(self, embed_dim=1024, depth=24, num_heads=None, patch_size=14, grid_size=37, mlp_hidden=None):
        super().__init__()
        num_heads = num_heads or max(embed_dim // HEAD_DIM, 1)
        if embed_dim % num_heads:
            raise ValueError(f'width {embed_dim} is not divisible by {num_heads} heads')
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.grid_size = patch_size, grid_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size * grid_size + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused at inference; kept for loading
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_hidden or 4 * embed_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.feature_dim = embed_dim
        self.eval()

    @classmethod
    def from_state_dict(cls, state_dict, num_heads=None):
        """Build the network whose sizes match `state_dict` and load it (strictly)."""
        try:
            embed_dim = state_dict['cls_token'].shape[-1]
            patch_size = state_dict['patch_embed.proj.weight'].shape[-1]
            num_tokens = state_dict['pos_embed'].shape[1] - 1
            mlp_hidden = state_dict['blocks.0.mlp.fc1.weight'].shape[0]
        except (KeyError, IndexError, AttributeError):
            raise ValueError('not a DINOv2 ViT state dict (expected cls_token, pos_embed, patch_embed.proj.weight, '
                             'blocks.0.mlp.fc1.weight)') from None
        depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
        grid_size = math.isqrt(num_tokens)
        if grid_size * grid_size != num_tokens:
            raise ValueError(f'DINOv2 pos_embed holds {num_tokens} patch positions, not a square grid')
        net = cls(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                  grid_size=grid_size, mlp_hidden=mlp_hidden)
        net.load_state_dict(state_dict, strict=True)
        return net

    def position_embedding(self, h_patches, w_patches):
        """The stored position embedding, bicubically resampled to an h x w patch grid.

        As in DINOv2, the resampling is given a scale factor (target + 0.1) / stored grid rather than a
        target size (this shifts the sampling positions slightly; the output size is still the
        target), with no antialiasing; it is computed in float32.
        """
        pos = self.pos_embed.float()
        m = self.grid_size
        if (h_patches, w_patches) == (m, m):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((h_patches + INTERPOLATE_OFFSET) / m, (w_patches + INTERPOLATE_OFFSET) / m)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode='bicubic', antialias=False)
        assert patch_pos.shape[-2:] == (h_patches, w_patches)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x):
        n, _, h, w = x.shape
        p = self.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h // p, w // p).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def preprocess(x: torch.Tensor, resize_mode: str = 'torch') -> torch.Tensor:
    """uint8-range images [N, 3, H, W] -> the normalised 224x224 input of FD_DINOv2.

    resize_mode 'torch': bicubic with antialiasing on the float pixels (fast, on any device).
    resize_mode 'pil': PIL's bicubic resize of the uint8 images (slow, on the CPU; the exact variant).
    """
    if resize_mode == 'pil':
        import PIL.Image
        arr = x.detach().to('cpu', torch.uint8).permute(0, 2, 3, 1).numpy()
        arr = np.stack([np.asarray(PIL.Image.fromarray(a, 'RGB').resize((RESOLUTION, RESOLUTION),
                                                                         PIL.Image.Resampling.BICUBIC))
                        for a in arr])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(x.device, torch.float32)
    elif resize_mode == 'torch':
        x = x.to(torch.float32)
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bicubic', antialias=True)
    else:
        raise ValueError(f"resize_mode must be 'torch' or 'pil', got {resize_mode!r}")
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std
