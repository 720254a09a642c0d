"""The tree's shape as docs/layout.md describes it: every module is named in "Where things are", and imports
flow from the command lines to training/ to edm2/, never back."""

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {p.stem for p in ROOT.glob('*.py')}


def _modules(folder):
    return sorted(p for p in (ROOT / folder).rglob('*.py') if p.name != '__init__.py')


def _layout_section():
    text = (ROOT / 'docs' / 'layout.md').read_text(encoding='utf-8')
    assert text.startswith('# Where things are'), 'docs/layout.md is not the "Where things are" page'
    return text


def _imported_roots(path):
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split('.')[0])
    return roots


def test_readme_layout_names_every_module():
    names = set(re.findall(r'[\w*]+\.(?:py|toml)', _layout_section()))
    missing = []
    for path in _modules('edm2') + _modules('training') + sorted(ROOT.glob('*.py')) + sorted(ROOT.glob('configs/*.toml')):
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in names):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f'docs/layout.md ("Where things are") does not mention: {", ".join(missing)}'
    listed = {n for n in names if '*' not in n}
    present = {p.name for p in ROOT.rglob('*.py') if '.venv' not in p.parts} | {p.name for p in ROOT.glob('configs/*')}
    assert listed <= present, f'docs/layout.md names files that do not exist: {sorted(listed - present)}'


def test_imports_flow_from_commands_to_training_to_edm2():
    wrong = []
    for path in _modules('edm2'):
        bad = _imported_roots(path) & (COMMANDS | {'training'})
        wrong += [f'{path.relative_to(ROOT)} imports {name}' for name in sorted(bad)]
    for path in _modules('training'):
        wrong += [f'{path.relative_to(ROOT)} imports {name}' for name in sorted(_imported_roots(path) & COMMANDS)]
    assert not wrong, '; '.join(wrong)
