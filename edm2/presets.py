"""Presets as data: every table lives in `configs/{name}.toml`; this module only reads them.

The directory is `$EDM2_CONFIG_DIR` when set; else `edm2/configs/` inside an installed package (a wheel
ships the top-level `configs/` there); else `configs/` beside the package (a checkout or editable install).
"""

import functools
import os
import pathlib

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from .errors import EDM2Error


class PresetError(EDM2Error):
    """Unknown preset or missing config file; the message is a single line meant for users."""


def config_dir() -> pathlib.Path:
    env = os.environ.get('EDM2_CONFIG_DIR')
    if env:
        return pathlib.Path(env)
    package = pathlib.Path(__file__).resolve().parent
    shipped = package / 'configs'
    return shipped if shipped.is_dir() else package.parent / 'configs'


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The whole table `configs/{name}.toml` as a dict (cached; treat it as read-only)."""
    path = config_dir() / f'{name}.toml'
    if not path.is_file():
        raise PresetError(f'config file not found: {path}')
    with open(path, 'rb') as f:
        return tomllib.load(f)


def get(name: str, key: str) -> dict:
    """One entry `[key]` of `configs/{name}.toml` as a fresh dict; unknown keys name the choices."""
    table = load(name)
    if key not in table:
        raise PresetError(f'unknown {name} preset {key!r}; choose one of: {", ".join(sorted(table))}')
    return dict(table[key])
