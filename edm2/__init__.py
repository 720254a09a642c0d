"""EDM2 and autoguidance: a clean-room, Apache-2.0 implementation.

Public API (imported lazily so that `import edm2` stays cheap):
    edm2.load_network(path_or_url, device=None) -> Precond (or, for 'diffusers:...', a text-to-image denoiser)
    edm2.load_snapshot(path_or_url) -> (net, encoder, metadata)
    edm2.save_network(path, net, encoder=None, **metadata)
"""

__version__ = '0.1.0'

_LAZY = {
    'load_network': 'edm2.checkpoint',
    'load_snapshot': 'edm2.checkpoint',
    'save_network': 'edm2.checkpoint',
}

__all__ = ['__version__', *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    """The public API (`__all__`) beside the module's own names: `dir(edm2)` shows load_network etc."""
    return sorted(set(globals()) | set(__all__))
