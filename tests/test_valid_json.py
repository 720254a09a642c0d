"""Every JSON file the project writes is valid JSON (edm2.jsontext): a value that could not be computed is
null with a warning, never a bare NaN; and a toy run whose sampling diverges is refused in one line instead
of reporting 100% outliers."""

import json
import math
import pathlib
import re

import numpy as np
import pytest
from click.testing import CliRunner

from edm2 import jsontext
from edm2.commands import toy_example
from edm2.metrics import report

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures('one_thread')


def _strict(text):
    """json.loads that refuses NaN / Infinity, as strict readers (browsers, jq, JSON.parse) do."""
    def refuse(word):
        raise ValueError(f'bare {word}')
    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_null_and_named():
    value = {'fid': float('nan'), 'runs': [{'fd': np.float64('inf')}, {'fd': 1.5}], 'n': 3, 'ok': True,
             'name': 'x', 'nothing': None, 'small': np.float32(0.25)}
    with pytest.warns(RuntimeWarning, match=r'results: not finite, written as null: fid, runs\[0\].fd$'):
        text = jsontext.dumps(value, 'results')
    assert _strict(text) == {'fid': None, 'runs': [{'fd': None}, {'fd': 1.5}], 'n': 3, 'ok': True, 'name': 'x',
                             'nothing': None, 'small': 0.25}
    assert jsontext.dumps({'a': 1e308 * 10}) == '{"a": null}'  # no warning asked for: none given


def test_a_metrics_record_with_a_nan_is_written_as_valid_json(tmp_path):
    path = tmp_path / 'm.json'
    with pytest.warns(RuntimeWarning, match='precision'):
        report.write_json(str(path), {'summary': {'fid': 2.5, 'precision': math.nan}})
    assert _strict(path.read_text()) == {'summary': {'fid': 2.5, 'precision': None}}


def test_no_writer_bypasses_the_strict_encoder():
    """The class, not the example: json.dump/json.dumps appear in the library and commands only strict
    (allow_nan=False), as a round trip (json.loads(json.dumps(...)), which copies and writes nothing), or
    quoting a value in an error message (data.py's _short)."""
    found = []
    for path in list((REPO / 'edm2').rglob('*.py')) + list((REPO / 'training').rglob('*.py')):
        if path.name == 'jsontext.py':
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r'\bjson\.dumps?\(', line) and not re.search(r'json\.loads\(json\.dumps\(|allow_nan=False|'
                                                                        r'^\s*text = json.dumps\(value\) if', line):
                found.append(f'{path.relative_to(REPO)}:{number}: {line.strip()}')
    assert not found, '\n'.join(found)


def test_toy_rules_that_diverge_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / 'r.png'
    result = CliRunner().invoke(toy_example.cli, ['rules', '--ideal', '--num', '64', '--steps', '4', '--device',
                                                  'cpu', '--ag-weight', '1e6', '--guidance-rule', 'lerp',
                                                  '--out', str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    assert lines[-1].startswith('Error:') and '--guidance-rule lerp: 64 of 64 samples are not finite' in lines[-1]
    assert list(tmp_path.iterdir()) == []
