"""Where the networks of one axis of an autoguidance sweep come from: post-hoc EMA reconstructions (EDM2
paper sec. 3.3) of a folder of snapshots at one training time, one fixed network file (an
unconditional guide gives a classifier-free guidance sweep), or, for the guide, a perturbation of each
cell's main network (`edm2.self_guides`: 'self:pag', 'self:skip=...').

    snapshot_source(folder, kimg, stds, flag)   an axis of EMA lengths, checked before any network is built
    file_source(path, flag)                      an axis of one fixed network
    self_source(spec, flag)                      the guide made from each cell's main network

Errors are `SweepError`s with one-line messages naming the flag (`flag`, e.g. '--net').
"""

import os

from safetensors import safe_open

from edm2 import phema, phema_reconstruct, self_guides

from .log import SweepError


class Source:
    """The networks of one axis: post-hoc EMA reconstructions from `snapshots` at time `kimg`, or one
    fixed network file (`path`, axis value None), or a perturbation of the main network (`self_guide`, an
    `edm2.self_guides.SelfGuide`; axis value None, nothing loaded). `flag` names the option for messages."""

    def __init__(self, flag, stds, snapshots=None, kimg=None, nimg=None, inputs=None, coefficients=None, path=None,
                 self_guide=None):
        self.flag, self.stds, self.snapshots, self.kimg, self.nimg = flag, stds, snapshots, kimg, nimg
        self.inputs, self.coefficients, self.path, self.self_guide = inputs, coefficients, path, self_guide

    @property
    def fixed(self):
        return self.path is not None

    @property
    def is_self(self):
        return self.self_guide is not None

    def describe(self):
        """JSON summary of what determines this axis's networks (compared on resume)."""
        if self.is_self:
            return {'self': str(self.self_guide)}
        if self.fixed:
            return {'file': str(self.path)}
        return {'kimg': self.kimg, 'nimg': self.nimg, 'inputs': [os.path.basename(str(s.source)) for s in self.inputs]}

    def provenance(self, index):
        """The snapshot files and coefficients of the network at axis position `index`."""
        if self.is_self:
            return {'self': str(self.self_guide)}
        if self.fixed:
            return {'file': str(self.path)}
        col = self.coefficients[:, index]
        return {'kimg': self.kimg, 'std': self.stds[index],
                'inputs': [os.path.basename(str(s.source)) for s in self.inputs],
                'coefficients': [float(c) for c in col]}


def snapshot_source(folder, kimg, stds, flag):
    """A Source over the snapshots in `folder` (checked: not empty, `kimg` present, stds in range)."""
    if not os.path.isdir(folder):
        raise SweepError(f'{flag}-dir: {folder} is not a folder')
    snapshots = phema_reconstruct.find_snapshots(folder)
    if not snapshots:
        raise SweepError(f'{flag}-dir: no snapshots named PREFIX-KIMG-STD.pkl or .safetensors in {folder}')
    kimgs = sorted({s.kimg for s in snapshots})
    if kimg is not None and int(kimg) not in kimgs:
        raise SweepError(f'{flag}-kimg {kimg}: no snapshot in {folder} has that time (have kimg {kimgs})')
    for std in stds:
        if not 0 < std < phema.SIGMA_REL_MAX:
            raise SweepError(f'{flag}-std: EMA length {std} outside (0, {phema.SIGMA_REL_MAX:.4f})')
    _check_same_tensors(snapshots, flag)
    try:
        kimg, nimg, inputs, coefficients = phema_reconstruct.plan_reconstruction(snapshots, stds, kimg)
    except phema.PhemaError as e:
        raise SweepError(f'{flag}-dir: {e}') from None
    return Source(flag, list(stds), snapshots, kimg, nimg, inputs, coefficients)


def _check_same_tensors(snapshots, flag):
    """Native snapshots must hold the same tensors (read from their headers; pickles are checked while
    they are read, still before the first cell)."""
    ref = None
    for snap in snapshots:
        if not str(snap.source).endswith('.safetensors'):
            continue
        try:
            with safe_open(str(snap.source), framework='pt', device='cpu') as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 -- any unreadable file: one line naming it
            raise SweepError(f'{flag}-dir: {snap.source}: unreadable ({type(e).__name__})') from None
        if ref is None:
            ref = (snap.source, shapes)
        elif shapes != ref[1]:
            raise SweepError(f'{flag}-dir: {snap.source} holds a different network than {ref[0]} '
                             f'(mismatched snapshot folder)')


def file_source(path, flag):
    return Source(flag, [None], path=path)


def self_source(spec, flag):
    """The guide axis of one perturbation of each cell's main network ('self:pag', 'self:skip=NAMES'); the
    block names are checked against the main network by the sweep's preflight."""
    try:
        guide = self_guides.parse_self_guide(spec)
    except self_guides.SelfGuideError as e:
        raise SweepError(f'{flag} {spec}: {e}') from None
    return Source(flag, [None], self_guide=guide)
