"""The tree's shape as docs/layout.md describes it: every module is named in "Where things are", and imports
flow one way, from the scripts to edm2/commands/ to edm2.training (training/) to the library, never back:
no import cycle, no click below the commands layer, and edm2/metrics/ holds metrics only."""

import ast
import fnmatch
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py (plain functions) and tests/conftest.py (fixtures)."""
    tests = {p.stem for p in (ROOT / 'tests').glob('test_*.py')}
    wrong = [f'{p.name} imports {name}' for p in sorted((ROOT / 'tests').glob('test_*.py'))
             for name in sorted(_imported_roots(p) & tests)]
    assert not wrong, '; '.join(wrong)


def test_imports_flow_from_commands_to_training_to_edm2():
    wrong = []
    for path in _modules('edm2'):
        bad = _imported_roots(path) & (COMMANDS | {'training'})
        wrong += [f'{path.relative_to(ROOT)} imports {name}' for name in sorted(bad)]
    for path in _modules('training'):
        wrong += [f'{path.relative_to(ROOT)} imports {name}' for name in sorted(_imported_roots(path) & COMMANDS)]
    assert not wrong, '; '.join(wrong)


# ----------------------------------------------------------------------------------------------------
# The import graph of edm2/ and training/ (installed as edm2.training), every import statement counted:
# module-level ones and the lazy ones inside functions.

def _module_name(path):
    """'edm2.sweep.run' for edm2/sweep/run.py, 'edm2.training.loop' for training/loop.py, 'edm2.metrics' for
    edm2/metrics/__init__.py."""
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[0] == 'training':
        parts.insert(0, 'edm2')
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _library_files():
    return sorted(p for folder in ('edm2', 'training') for p in (ROOT / folder).rglob('*.py'))


def _is_main_guard(node):
    """`if __name__ == '__main__':`: a module's entry point as a program (`python -m edm2.download`), which
    runs only when the module is the program itself, never when the library imports it."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == '__name__'
            and len(test.comparators) == 1 and getattr(test.comparators[0], 'value', None) == '__main__')


def _library_nodes(tree):
    """Every node of a module's tree except those of its `__main__` block (see `_is_main_guard`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_main_guard(child))


def _import_edges(path, known):
    """{imported name: line} of one file: a module of the graph where the import names one, else the
    imported name itself (a third-party module, or an unknown edm2 name). The `__main__` block of a library
    module (a thin program entry into edm2.commands) is not an import of the library."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    edges = {}
    for node in _library_nodes(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                edges.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                up = package.split('.')[:len(package.split('.')) - (node.level - 1)]
                base = '.'.join(up + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f'{base}.{alias.name}'
                edges.setdefault(sub if sub in known else base, node.lineno)
    return edges


@functools.lru_cache(maxsize=None)
def _graph():
    """({module: {imported: line}} over edm2/ and training/, {module: file}); read once per session."""
    files = {_module_name(p): p for p in _library_files()}
    return {name: _import_edges(path, set(files)) for name, path in files.items()}, files


def _cycles(graph):
    """The strongly connected components with more than one module (or a module importing itself), as
    sorted lists (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_circle_and_nothing_else():
    graph = {'a': {'b': 1}, 'b': {'c': 1}, 'c': {'a': 1, 'd': 1}, 'd': {'numpy': 1}, 'e': {'e': 1}, 'f': {'d': 1}}
    assert sorted(_cycles(graph)) == [['a', 'b', 'c'], ['e']]


def test_no_import_cycle_in_edm2_and_training():
    graph, _ = _graph()
    assert 'edm2.sweep.run' in graph and 'edm2.training.loop' in graph
    assert graph['edm2.training.loop'].get('edm2.training.state'), 'relative imports are not resolved'
    cycles = _cycles(graph)
    assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def _is_under(name, package):
    return name == package or name.startswith(package + '.')


def test_only_the_commands_layer_imports_click_or_the_commands():
    graph, files = _graph()
    wrong = []
    for module, edges in graph.items():
        if _is_under(module, 'edm2.commands'):
            continue
        for imported, line in edges.items():
            if _is_under(imported, 'click') or _is_under(imported, 'edm2.commands'):
                wrong.append(f'{files[module].relative_to(ROOT)}:{line} imports {imported}')
    assert not wrong, '; '.join(wrong)


def test_library_does_not_import_training_and_training_not_the_commands():
    graph, files = _graph()
    wrong = [f'{files[m].relative_to(ROOT)}:{line} imports {i}' for m, edges in graph.items() for i, line in edges.items()
             if not _is_under(m, 'edm2.commands') and not _is_under(m, 'edm2.training') and _is_under(i, 'edm2.training')]
    assert not wrong, '; '.join(wrong)


@pytest.mark.slow  # a fresh interpreter importing torch and every module: about 8 s on a busy 2-core machine
def test_importing_every_library_module_imports_no_click():
    """A library user who never touches a command line imports no click, not even through a dependency."""
    _, files = _graph()
    names = [n for n in files if not _is_under(n, 'edm2.commands')]
    code = ('import importlib, json, sys\n'
            f'for name in {names!r}:\n'
            '    importlib.import_module(name)\n'
            'print(json.dumps(sorted(m for m in sys.modules if m == "click" or m.startswith("click."))))\n')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT / 'tests')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == []


# What edm2/metrics/ may import from the rest of edm2: the plumbing every module uses (ranks, downloads,
# one-line errors, atomic writes, restricted unpickling), and where the images it measures come from --
# a dataset folder (edm2.data) for the modules that read one, a network's generated images
# (edm2.generation, seeds -> images) for network_features.py. Nothing that builds, reconstructs or samples
# networks directly, and nothing of the sweep, the training loop or the commands: those use the metrics.
METRICS_PLUMBING = {'edm2.distributed', 'edm2.download', 'edm2.errors', 'edm2.fileio', 'edm2.jsontext', 'edm2.limits',
                    'edm2.safe_pickle'}
METRICS_IMAGE_SOURCES = {'edm2.metrics.dataset_features': {'edm2.data'}, 'edm2.metrics.dataset_reference': {'edm2.data'},
                         'edm2.metrics.network_features': {'edm2.generation'}}


def test_metrics_holds_metrics_only():
    graph, files = _graph()
    wrong = []
    for module, edges in graph.items():
        if not _is_under(module, 'edm2.metrics'):
            continue
        allowed = METRICS_PLUMBING | METRICS_IMAGE_SOURCES.get(module, set())
        for imported, line in edges.items():
            if _is_under(imported, 'edm2') and not _is_under(imported, 'edm2.metrics') and imported not in allowed:
                wrong.append(f'{files[module].relative_to(ROOT)}:{line} imports {imported}')
    assert not wrong, 'edm2/metrics/ holds metrics only; ' + '; '.join(wrong)
    assert not any('sweep' in p.name for p in (ROOT / 'edm2' / 'metrics').glob('*.py'))
