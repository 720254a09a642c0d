"""Damaged outputs are not "existing": generate_images.py --skip-existing regenerates a PNG that does not
decode in full, and the sweep skips a damaged line of cells.jsonl (saying so) and recomputes that cell."""

import json

import pytest
from helpers import cells_by_key, pngs, run_cli, sweep_cells, sweep_config, synthetic_surface

from edm2.sweep import run as sweep_lib

pytestmark = pytest.mark.usefixtures('one_thread')


def test_skip_existing_regenerates_empty_truncated_and_corrupt_pngs(nets, tmp_path):
    out = tmp_path / 'out'
    args = ['--net', nets['main'], '--seeds', '0-5', '--batch', 2, '--steps', 2, '--outdir', out]
    assert run_cli(*args).exit_code == 0
    first = {p: (out / p).read_bytes() for p in pngs(out)}
    (out / '000001.png').write_bytes(b'')                                        # zero bytes
    (out / '000002.png').write_bytes(first['000002.png'][:len(first['000002.png']) // 2])  # cut in the middle
    (out / '000004.png').write_bytes(b'GIF89a' + first['000004.png'][6:])        # not a PNG
    result = run_cli(*args, '--skip-existing')
    assert result.exit_code == 0, result.output
    assert f'Done: wrote 3 images to "{out}"' in result.output
    assert {p: (out / p).read_bytes() for p in pngs(out)} == first


def test_sweep_skips_a_damaged_middle_line_and_recomputes_its_cell(sweep_assets, tmp_path, capsys):
    out = tmp_path / 'out'
    whole = sweep_lib.run_sweep(sweep_config(sweep_assets), out, cell_metrics=synthetic_surface, progress=False)
    lines = (out / 'cells.jsonl').read_bytes().split(b'\n')
    assert len(lines) == 19 and lines[-1] == b''
    lines[4] = lines[4][:30] + b'\x00garbage' + lines[4][30:]      # not JSON any more
    lines[9] = json.dumps({'net_std': 0.05}).encode()               # JSON, but not a cell
    (out / 'cells.jsonl').write_bytes(b'\n'.join(lines))
    capsys.readouterr()
    res = sweep_lib.run_sweep(sweep_config(sweep_assets), out, cell_metrics=synthetic_surface, progress=False)
    said = [line for line in capsys.readouterr().out.splitlines() if 'damaged' in line]
    assert len(said) == 1 and 'line(s) 5, 10' in said[0] and 'cells.jsonl' in said[0]
    assert res['evaluated'] == 2
    cells = sweep_cells(out)  # every line parses again
    assert len(cells) == 18
    assert {k: c['fid'] for k, c in cells_by_key(cells).items()} == {k: c['fid'] for k, c in cells_by_key(whole['cells']).items()}
