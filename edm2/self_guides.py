"""Guides made from the main network itself: the same network, perturbed only while it evaluates as a guide.

- 'self:pag' — perturbed-attention guidance (Ahn et al., "Self-Rectifying Diffusion Sampling with
  Perturbed-Attention Guidance", ECCV 2024, sec. 4): in each perturbed self-attention block the attention
  weights softmax(Q Kᵀ / √d) become the identity, so the attention branch outputs the projection of the
  block's own value vectors. 'self:pag' perturbs every attention block; 'self:pag=enc.8x8_block1,dec.8x8_in0'
  only the named ones.
- 'self:skip=NAMES' — skip-layer guidance: the named blocks return their input unchanged; only blocks whose
  input and output shapes agree (no resampling, as many channels out as in) may be named.

Block names are the U-Net's module names of the published state dicts (`unet.enc.8x8_block1.attn_qkv.weight`
belongs to block 'enc.8x8_block1'; the 'unet.' prefix may be given). `SelfGuide.bind(net)` returns a guide
that evaluates the very same network object (shared parameters, no copy of the weights) with the
perturbation switched on for that call only: it is an argument of the call (`perturbation=` of
`edm2.networks.Precond`), never state of the shared network, so two threads sharing one network, one
guiding with a perturbation and one not, never see each other's. A bound guide costs one main-network
evaluation per guided evaluation.
"""

import dataclasses
import re
from typing import Optional

from .errors import EDM2Error
from .networks import Block, UNet

PREFIX = 'self:'
KINDS = ('pag', 'skip')
_NAME = re.compile(r'[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*')


class SelfGuideError(EDM2Error):
    """A self-guide spec or block name that cannot be used; the message is one line naming the value."""


def is_self_guide(spec) -> bool:
    """Whether a --gnet value names a perturbation of the main network ('self:...') rather than a file."""
    return isinstance(spec, str) and spec.strip().startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class SelfGuide:
    """A perturbation of the main network: kind 'pag' or 'skip', and the block names (None: every
    attention block, for 'pag' only). `str()` is the canonical spec, the inverse of `parse_self_guide`."""

    kind: str
    blocks: Optional[tuple] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SelfGuideError(f'unknown self guide {self.kind!r}; expected one of: {", ".join(KINDS)}')
        if self.blocks is not None:
            if not self.blocks:
                raise SelfGuideError(f'{PREFIX}{self.kind}: the list of blocks is empty')
            object.__setattr__(self, 'blocks', tuple(self.blocks))
        elif self.kind == 'skip':
            raise SelfGuideError(f'{PREFIX}skip needs the blocks to skip, e.g. {PREFIX}skip=dec.8x8_in1')

    def __str__(self):
        return PREFIX + self.kind + ('' if self.blocks is None else '=' + ','.join(self.blocks))

    def bind(self, net) -> 'PerturbedNetwork':
        """The guide made from `net`: checks the block names against it (SelfGuideError naming the block
        and listing the allowed ones)."""
        blocks = network_blocks(net)
        if self.kind == 'pag':
            allowed = [name for name, block in blocks.items() if block.num_heads]
            if not allowed:
                raise SelfGuideError(f'{self}: the network has no self-attention blocks to perturb')
            what = 'attention blocks'
        else:
            allowed = [name for name, block in blocks.items() if keeps_shape(block)]
            what = 'blocks whose input and output shapes agree'
        for name in self.blocks or ():
            if name not in allowed:
                reason = 'is not a block of the network' if name not in blocks else \
                    'has no self-attention' if self.kind == 'pag' else 'changes the shape of its input'
                raise SelfGuideError(f'{self}: {name!r} {reason}; {what}: {", ".join(allowed) or "none"}')
        chosen = allowed if self.blocks is None else list(self.blocks)
        return PerturbedNetwork(net, self, chosen)


def parse_self_guide(spec) -> SelfGuide:
    """'self:pag', 'self:pag=enc.8x8_block1,dec.8x8_in0' or 'self:skip=NAMES' -> a SelfGuide. A SelfGuide
    is returned as it is. Raises SelfGuideError naming the spec."""
    if isinstance(spec, SelfGuide):
        return spec
    text = str(spec).strip()
    if not text.startswith(PREFIX):
        raise SelfGuideError(f'{text!r} is not a self guide (expected {PREFIX}pag or {PREFIX}skip=BLOCKS)')
    kind, eq, names = text[len(PREFIX):].partition('=')
    kind = kind.strip()
    if kind not in KINDS:
        raise SelfGuideError(f'unknown self guide {text!r}; expected {PREFIX}pag[=BLOCKS] or {PREFIX}skip=BLOCKS')
    if not eq:
        return SelfGuide(kind)
    blocks = []
    for name in (part.strip() for part in names.split(',')):
        name = name[len('unet.'):] if name.startswith('unet.') else name
        if not _NAME.fullmatch(name):
            raise SelfGuideError(f'self guide {text!r}: {name!r} is not a block name (e.g. enc.8x8_block1)')
        if name in blocks:
            raise SelfGuideError(f'self guide {text!r}: block {name!r} given twice')
        blocks.append(name)
    return SelfGuide(kind, tuple(blocks))


def network_blocks(net) -> dict:
    """{'enc.16x16_block0': Block, ..., 'dec.8x8_in0': Block, ...}: the U-Net blocks of `net`, in order."""
    unets = [module for module in net.modules() if isinstance(module, UNet)] if hasattr(net, 'modules') else []
    if len(unets) != 1:
        raise SelfGuideError(f'a self guide needs an EDM2 network (one edm2.networks.UNet inside), '
                             f'got a {type(net).__name__}')
    unet = unets[0]
    return {f'{part}.{name}': block for part, modules in (('enc', unet.enc), ('dec', unet.dec))
            for name, block in modules.items() if isinstance(block, Block)}


def keeps_shape(block: Block) -> bool:
    """Whether the block's output has its input's shape (no resampling, as many channels out as in)."""
    return block.resample_mode == 'keep' and block.conv_skip is None


class PerturbedNetwork:
    """A guide D_0 = the main network with a `SelfGuide` perturbation of the named blocks; called like the
    network, which it calls with `perturbation={name: kind}`. It holds no weights and no state of its own
    and has the main network's img_channels, img_resolution and label_dim (so
    `edm2.sampling.GuidedDenoiser` gives it the main network's labels)."""

    def __init__(self, net, spec: SelfGuide, blocks):
        self.net, self.spec, self.blocks = net, spec, tuple(blocks)
        self.perturbation = {name: spec.kind for name in self.blocks}
        self.img_channels = net.img_channels
        self.img_resolution = net.img_resolution
        self.label_dim = getattr(net, 'label_dim', 0)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        return self.net(x, sigma, class_labels, perturbation=self.perturbation, **kwargs)

    def __repr__(self):
        return f'PerturbedNetwork({self.spec}, {len(self.blocks)} block(s))'
