"""Valid JSON text for everything the project writes: a non-finite number becomes null, never bare NaN.

Python's `json` writes NaN and Infinity as bare words that no strict reader accepts. `dumps` replaces
every non-finite float (numpy scalars included) by null, encodes with `allow_nan=False`, and
warns once naming the keys replaced (`what` says whose values they are), so that a value that could not be
computed is visible in the file and on the console instead of silently breaking the file.
"""

import json
import math
import numbers
import warnings


def _finite(value, path, replaced):
    if isinstance(value, dict):
        return {k: _finite(v, f'{path}.{k}' if path else str(k), replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f'{path}[{i}]', replaced) for i, v in enumerate(value)]
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        if not math.isfinite(float(value)):
            replaced.append(path or 'the value')
            return None
        return float(value)
    return value


def finite(value):
    """(a copy of `value` with every non-finite float replaced by None, [paths of the replaced ones])."""
    replaced = []
    return _finite(value, '', replaced), replaced


def dumps(value, what=None, **kwargs) -> str:
    """json.dumps of `value` that is always valid JSON (see the module docstring); `what` names the data in
    the warning about replaced values (no warning when None)."""
    value, replaced = finite(value)
    if replaced and what is not None:
        shown = ', '.join(replaced[:4]) + (f' and {len(replaced) - 4} more' if len(replaced) > 4 else '')
        warnings.warn(f'{what}: not finite, written as null: {shown}', RuntimeWarning, stacklevel=2)
    return json.dumps(value, allow_nan=False, **kwargs)
