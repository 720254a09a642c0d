"""The network as it was at a git revision (imported as `baseline` by bench/*.py): benchmarks build it beside
today's network from the same weights and time both in one process, so ratios are against the same load."""

import importlib.util
import subprocess
import sys
import tempfile
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _module_from_source(name, source):
    folder = pathlib.Path(tempfile.mkdtemp(prefix='edm2-baseline-'))
    path = folder / f'{name}.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def networks_at(revision):
    """edm2.networks (with its edm2.mp) as of `revision`, as a separate module; None if git cannot give it."""
    def show(path):
        return subprocess.run(['git', 'show', f'{revision}:{path}'], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    try:
        mp_source, net_source = show('edm2/mp.py'), show('edm2/networks.py')
    except (OSError, subprocess.CalledProcessError):
        return None
    tag = revision.replace('/', '_').replace('~', '_').replace('^', '_')
    _module_from_source(f'edm2_mp_{tag}', mp_source)
    return _module_from_source(f'edm2_networks_{tag}', net_source.replace('from edm2.mp import',
                                                                          f'from edm2_mp_{tag} import'))


def same_network(module, net, precision='fp32'):
    """A network of `module` (an old edm2.networks) with the constructor arguments and weights of `net`."""
    old = module.Precond(**net.init_kwargs)
    old.load_state_dict(net.state_dict())
    old.precision = precision  # on CUDA the old rule runs net.precision; fp32 is the baseline
    return old.to(next(net.parameters()).device)
