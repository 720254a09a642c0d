"""Flags that were silently ignored or ended in a traceback: the guide-EMA flags of a sweep whose guide is a
file or a self guide, and seed lists too long for a 64-bit count."""

import os

import pytest
from click.testing import CliRunner
from helpers import self_sweep_args, sweep_args

from edm2.commands import calculate_metrics
from edm2.commands import generate_images
from edm2.commands import toy_example

pytestmark = pytest.mark.usefixtures('one_thread')


def _one_line(result, *fragments):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and 'Traceback' not in result.output, (result.exit_code, result.output)
    assert lines[-1].startswith('Error:') and all(f in lines[-1] for f in fragments), lines[-1]


def test_sweep_refuses_ema_flags_that_cannot_apply(sweep_assets, tmp_path):
    out = tmp_path / 'out'
    result = CliRunner().invoke(calculate_metrics.cli, self_sweep_args(sweep_assets, out, ['--gnet-std', '0.05,0.1',
                                                                                 '--gnet-kimg', '16']))
    _one_line(result, '--gnet-kimg and --gnet-std', 'self:pag')
    args = sweep_args(sweep_assets, out)
    i = args.index('--net-dir')
    args[i:i + 2] = ['--net', os.path.join(sweep_assets['main'], sorted(os.listdir(sweep_assets['main']))[0])]
    _one_line(CliRunner().invoke(calculate_metrics.cli, args), '--net-std', 'a fixed network file')
    assert not out.exists()


@pytest.mark.parametrize('seeds, fragment', [('0-99999999999999999999', 'too large'),
                                             ('0-9223372036854775807', 'holds more than'),
                                             ('5,0-9223372036854775806', 'holds more than')])
def test_seed_lists_beyond_a_64_bit_count_are_one_line(seeds, fragment, tmp_path):
    result = CliRunner().invoke(generate_images.main, ['--net', str(tmp_path / 'n.safetensors'), '--outdir',
                                                       str(tmp_path / 'o'), '--seeds', seeds])
    _one_line(result, '--seeds', fragment)
    result = CliRunner().invoke(toy_example.cli, ['eval', '--ideal', '--out', str(tmp_path / 'e.json'),
                                                  '--seed', '99999999999999999999'])
    _one_line(result, '--seed', 'must lie in')
    assert list(tmp_path.iterdir()) == []
