"""Where the networks of one axis of an autoguidance sweep come from: one small class per kind, each
answering the same questions, so that the sweep never asks which kind it holds.

    SnapshotSource   post-hoc EMA reconstructions (EDM2 paper sec. 3.3) of a folder of snapshots at one
                     training time; the axis values are EMA lengths
    FileSource       one fixed network file (an unconditional guide gives a classifier-free guidance sweep)
    SelfSource       for the guide: a perturbation of each cell's main network (`edm2.self_guides`:
                     'self:pag', 'self:skip=...'); holds and builds nothing

    snapshot_source(folder, kimg, stds, flag)   a SnapshotSource, checked before any network is built
    file_source(path, flag)                      a FileSource
    self_source(spec, flag)                      a SelfSource

The questions: what a cell records about its network (`describe`, `provenance`), how many networks are
held at once (`held`, `memory`), how many reconstructions the grid plans (`planned`), building them
(`build`, the only calls into post-hoc EMA reconstruction and network loading), one network for the
checks before any cell (`first_network`, `check_guide`), the network a cell uses (`for_cell`) and the
flag value that reproduces the best cell (`rebuild`, `flag_value`).

Errors are `SweepError`s with one-line messages naming the flag (`flag`, e.g. '--net').
"""

import os

from safetensors import safe_open

from edm2 import phema, phema_reconstruct, sampling, self_guides
from edm2.checkpoint import load_snapshot

from .log import SweepError


def reconstruct_phema(snapshots, stds, kimg, device, loader=None):
    """Reconstruct the EMA lengths `stds` at `kimg` in one pass over the snapshots (each read once):
    [(net, encoder, metadata, [(snapshot, weight), ...]), ...] in the order of `stds`."""
    recs = []
    for batch in phema_reconstruct.reconstruct_batches(snapshots, stds, kimg, batch=len(stds), device=device,
                                                       loader=loader):
        recs += [(r.net, r.encoder, r.metadata, r.coefficients) for r in batch]
    return recs


def load_network_file(path, device):
    """(net, encoder) of a fixed network file, in eval mode."""
    net, encoder, _ = load_snapshot(path, device=device)
    return net.eval().requires_grad_(False), encoder


def float32_bytes(net):
    """Bytes of `net`'s parameters in float32 (a lower estimate of what holding it costs)."""
    return 4 * sum(p.numel() for p in net.parameters())


def _count(counter, key, n=1):
    counter[key] = counter.get(key, 0) + n


class Source:
    """The networks of one axis. `flag` names the option for messages ('--net', '--gnet'); `stds` are the
    axis values (EMA lengths, or [None] for a kind with a single network). The defaults below are those of
    a kind with one network of its own (FileSource)."""

    def __init__(self, flag, stds):
        self.flag, self.stds = flag, list(stds)

    def describe(self):
        """JSON summary of what determines this axis's networks (compared on resume)."""
        raise NotImplementedError

    def provenance(self, index):
        """What made the network at axis position `index` (recorded in every cell)."""
        return self.describe()

    def summary(self):
        """One line for the plan printed before the sweep starts."""
        raise NotImplementedError

    def held(self, batch):
        """Networks of this axis held at once when `batch` of them may be built together."""
        return 1

    def memory(self, held, net):
        """Bytes that `held` networks like `net` take while this axis is being built."""
        return held * float32_bytes(net)

    def planned(self, count):
        """Of `count` reconstructions the grid order plans for an axis of this length, those this kind makes."""
        return 0

    def build(self, indices, device, loader, counter):
        """[(net, encoder)] of the axis positions `indices`, built in one go; `counter` counts the work."""
        raise NotImplementedError

    def first_network(self, device):
        """One network of the axis, for the checks made before any cell (None: nothing of its own)."""
        raise NotImplementedError

    def check_guide(self, net, gnet):
        """Raise SweepError unless this axis's `gnet` (its first_network) can guide the main network `net`."""
        try:
            sampling.check_guide(net, gnet)
        except sampling.SamplingError as e:
            raise SweepError(f'{self.flag}: {str(e).strip()}') from None

    def for_cell(self, held, net):
        """The network a cell uses, from the one held for it and the cell's main network `net`."""
        return held

    def index(self, std):
        """The axis position of the value `std` a cell recorded."""
        return 0

    def rebuild(self, std, device, loader=None):
        """(net, encoder) of the axis value `std`, built afresh (for --save-best); None if none of its own."""
        return self.build([self.index(std)], device, loader, {})[0]

    def metadata(self):
        """Training time to store with a network written from this axis: {'kimg', 'nimg'} (None: unknown)."""
        return {'kimg': None, 'nimg': None}

    def flag_value(self, saved):
        """What --net/--gnet takes to reproduce this axis's network, given the file `saved` it was written to."""
        return saved


class SnapshotSource(Source):
    """Post-hoc EMA reconstructions of EMA lengths `stds` at time `kimg` (`nimg` images) from `snapshots`;
    `inputs` are the snapshots taking part and `coefficients` their weights [inputs, stds]."""

    def __init__(self, flag, stds, snapshots, kimg, nimg, inputs, coefficients):
        super().__init__(flag, stds)
        self.snapshots, self.kimg, self.nimg, self.inputs, self.coefficients = snapshots, kimg, nimg, inputs, coefficients

    def _names(self):
        return [os.path.basename(str(s.source)) for s in self.inputs]

    def describe(self):
        return {'kimg': self.kimg, 'nimg': self.nimg, 'inputs': self._names()}

    def provenance(self, index):
        """The snapshot files and coefficients of the network at axis position `index`."""
        return {'kimg': self.kimg, 'std': self.stds[index], 'inputs': self._names(),
                'coefficients': [float(c) for c in self.coefficients[:, index]]}

    def summary(self):
        return f'{len(self.inputs)} snapshots at kimg {self.kimg}, EMA lengths {self.stds}'

    def held(self, batch):
        return min(batch, len(self.stds))

    def memory(self, held, net):
        return (held + 1) * float32_bytes(net)  # plus one input snapshot while reconstructing

    def planned(self, count):
        return count

    def build(self, indices, device, loader, counter):
        recs = reconstruct_phema(self.snapshots, [self.stds[i] for i in indices], self.kimg, device, loader)
        _count(counter, 'reconstructions', len(indices))
        _count(counter, 'batches')
        return [(net, encoder) for net, encoder, _, _ in recs]

    def first_network(self, device):
        return load_network_file(self.inputs[0].source, device)[0]

    def index(self, std):
        return min(range(len(self.stds)), key=lambda n: abs(self.stds[n] - std))

    def metadata(self):
        return {'kimg': self.kimg, 'nimg': self.nimg}


class FileSource(Source):
    """One fixed network file `path` (axis value None)."""

    def __init__(self, flag, path):
        super().__init__(flag, [None])
        self.path = path

    def describe(self):
        return {'file': str(self.path)}

    def summary(self):
        return str(self.path)

    def build(self, indices, device, loader, counter):
        _count(counter, 'loads')
        return [load_network_file(self.path, device)]

    def first_network(self, device):
        return load_network_file(self.path, device)[0]


class SelfSource(Source):
    """The guide made from each cell's main network by the perturbation `guide` (an
    `edm2.self_guides.SelfGuide`; axis value None): nothing is held or loaded, it shares the main
    network's parameters."""

    def __init__(self, flag, guide):
        super().__init__(flag, [None])
        self.guide = guide

    def describe(self):
        return {'self': str(self.guide)}

    def summary(self):
        return f'{self.guide}, a perturbation of each main network'

    def held(self, batch):
        return 0

    def memory(self, held, net):
        return 0

    def build(self, indices, device, loader, counter):
        return [(None, None) for _ in indices]

    def first_network(self, device):
        return None

    def check_guide(self, net, gnet):
        """The named blocks exist in the main network `net` and take the perturbation."""
        try:
            self.guide.bind(net)
        except self_guides.SelfGuideError as e:
            raise SweepError(f'{self.flag} {self.guide}: {e}') from None

    def for_cell(self, held, net):
        return self.guide.bind(net)  # shares the main network's parameters

    def rebuild(self, std, device, loader=None):
        return None

    def flag_value(self, saved):
        return str(self.guide)


def snapshot_source(folder, kimg, stds, flag):
    """A SnapshotSource over the snapshots in `folder` (checked: not empty, `kimg` present, stds in range)."""
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
    return SnapshotSource(flag, list(stds), snapshots, kimg, nimg, inputs, coefficients)


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
    """A FileSource of the network file `path`."""
    return FileSource(flag, path)


def self_source(spec, flag):
    """The guide axis of one perturbation of each cell's main network ('self:pag', 'self:skip=NAMES'); the
    block names are checked against the main network by the sweep's preflight."""
    try:
        guide = self_guides.parse_self_guide(spec)
    except self_guides.SelfGuideError as e:
        raise SweepError(f'{flag} {spec}: {e}') from None
    return SelfSource(flag, guide)
