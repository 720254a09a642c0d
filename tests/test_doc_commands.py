"""Every command line the documentation quotes parses: each `python SCRIPT.py ...`, `torchrun ... SCRIPT.py ...`,
`python -m edm2...` and `edm2-*` line in the code blocks and inline code of README.md, CONTRIBUTING.md and
docs/*.md is parsed by the real click command (flags, subcommands, values), so that a flag renamed or removed
in the code, or misspelt in a page, fails here. Values that only exist on the author's machine (files, URLs)
are not opened: a missing file or a placeholder value (`…`) is fine, an unknown flag, an unknown
subcommand or a stray argument is not."""

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from edm2 import threads

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / 'README.md', ROOT / 'CONTRIBUTING.md', *(ROOT / 'docs').glob('*.md')])
FENCE = re.compile(r'^(```|~~~)[^\n]*\n(.*?)^\1', re.S | re.M)
INLINE = re.compile(r'`([^`\n]+)`')
# The command lines of the project: script or module name -> (module of edm2.commands, its click object).
COMMANDS = {
    'generate_images.py': ('generate_images', 'main'), 'edm2-generate': ('generate_images', 'main'),
    'train_edm2.py': ('train_edm2', 'main'), 'edm2-train': ('train_edm2', 'main'),
    'reconstruct_phema.py': ('reconstruct_phema', 'main'), 'edm2-phema': ('reconstruct_phema', 'main'),
    'calculate_metrics.py': ('calculate_metrics', 'cli'), 'edm2-metrics': ('calculate_metrics', 'cli'),
    'dataset_tool.py': ('dataset_tool', 'cli'), 'edm2-dataset': ('dataset_tool', 'cli'),
    'toy_example.py': ('toy_example', 'cli'), 'edm2-toy': ('toy_example', 'cli'),
    'edm2.commands.checkpoint_cli': ('checkpoint_cli', 'cli'), 'edm2-checkpoint': ('checkpoint_cli', 'cli'),
    'edm2.checkpoint_cli': ('checkpoint_cli', 'cli'), 'edm2.checkpoint': ('checkpoint_cli', 'cli'),
    'edm2.download': ('download', 'cli'),
}
PLACEHOLDERS = ('…', '...')
# What a quoted line may get wrong only because it is an example: values that are not there (files, URLs,
# placeholders); an inline mention (`calculate_metrics.py gen`) may also leave out required flags, a line of a
# code block (a command to copy) may not.
TOLERATED = ('BadParameter', 'BadOptionUsage', 'FileError')
ASSIGNMENT = re.compile(r'([A-Z_][A-Z0-9_]*)="([^"]*)"')


def code_texts(text):
    """[(code, fenced)]: the code blocks' lines (backslash continuations joined; a shell variable set in the
    block, NAME="...", is expanded where a later line uses $NAME), then the inline code spans outside them."""
    out = []
    for _, block in FENCE.findall(text):
        variables = {}
        for line in block.replace('\\\n', ' ').splitlines():
            assignment = ASSIGNMENT.fullmatch(line.strip())
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = re.sub(rf'\${name}\b', lambda _: value, line)
            out.append((line, True))
    out += [(span, False) for span in INLINE.findall(FENCE.sub('', text))]
    return out


def command_lines(text):
    """[(script, args, fenced)] of every project command line in `text`."""
    found = []
    for line, fenced in code_texts(text):
        try:
            lexer = shlex.shlex(line, posix=True)
            lexer.whitespace_split, lexer.commenters = True, '#'
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: prose, not a command
            continue
        segment = []
        for token in tokens + [';']:
            if token in ('&&', '||', '|', ';'):
                found += [(*command, fenced) for command in _one_command(segment)]
                segment = []
            else:
                segment.append(token)
    return found


def _one_command(tokens):
    tokens = [t for t in tokens if not re.fullmatch(r'[A-Z_][A-Z0-9_]*=\S*', t)]  # VAR=value prefixes
    for i, token in enumerate(tokens):
        name = token.rsplit('/', 1)[-1]
        if name in COMMANDS and (i == 0 or name.endswith('.py') or tokens[i - 1] == '-m'):
            if i > 0 and not (tokens[i - 1] == '-m' or re.search(r'python3?$|torchrun$|\.py$|^--', tokens[i - 1])
                              or tokens[0] in ('torchrun', 'python', 'python3') or tokens[0].endswith('python')):
                return []
            args = [t[1:-1] if t.startswith('[') and t.endswith(']') and t[1:2] == '-' else t for t in tokens[i + 1:]]
            if (all(a in PLACEHOLDERS for a in args)                 # a mention: `python generate_images.py …`
                    or any(a.rsplit('/', 1)[-1] in COMMANDS for a in args)  # a list of the scripts' names
                    or any('|' in a and not a.startswith('-') for a in args)):  # a synopsis: info|convert
                return []
            return [(name, ['PLACEHOLDER' if a in PLACEHOLDERS else a for a in args])]
    return []


def _rest(ctx):
    """The arguments a group left for its subcommand (click 8.2 keeps the first in `_protected_args`)."""
    protected = ctx._protected_args if hasattr(ctx, '_protected_args') else ctx.protected_args
    return [*protected, *ctx.args]


def parse(script, args, complete=True):
    """None when `args` parses for `script`, else the click error's kind and message; `complete`: a missing
    required flag is an error too."""
    module, attr = COMMANDS[script]
    command = getattr(importlib.import_module(f'edm2.commands.{module}'), attr)
    try:
        ctx = command.make_context(script, list(args))
        while isinstance(command, click.Group) and _rest(ctx):
            rest = _rest(ctx)
            name, command, rest = command.resolve_command(ctx, rest)
            ctx = command.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit:  # --help, --version
        return None
    except click.UsageError as e:
        original = getattr(e, 'original', e)
        kind = type(original).__name__
        if kind in TOLERATED and not isinstance(original, click.NoSuchOption):
            return None
        if kind == 'MissingParameter' and not complete:
            return None
        return f'{kind}: {e.format_message().splitlines()[0]}'
    finally:
        threads.configure()  # a quoted --threads N must not change the rest of the suite
    return None


def test_extraction():
    text = ('Run\n```\npython generate_images.py --net a.pkl \\\n    --outdir out   # comment\n'
            'torchrun --nproc_per_node=8 train_edm2.py --outdir=x && ls\n'
            'OMP_NUM_THREADS=1 .venv/bin/python toy_example.py demo\n```\n'
            'inline `python -m edm2.download fetch URL --to DIR [--x]` and `make test` and `pip install .`\n')
    assert command_lines(text) == [('generate_images.py', ['--net', 'a.pkl', '--outdir', 'out'], True),
                                   ('train_edm2.py', ['--outdir=x'], True), ('toy_example.py', ['demo'], True),
                                   ('edm2.download', ['fetch', 'URL', '--to', 'DIR', '--x'], False)]


def test_a_wrong_flag_is_caught():
    assert 'No such option' in parse('toy_example.py', ['train', '--no-such-flag', '1'])
    assert 'No such command' in parse('calculate_metrics.py', ['calculus'])
    assert 'unexpected extra argument' in parse('generate_images.py', ['--outdir', 'out', 'stray'])
    assert parse('toy_example.py', ['plot', '--net', 'missing.pkl', '--guidance', '…']) is None
    assert "Missing option '--out'" in parse('toy_example.py', ['rules', '--ideal'])
    assert parse('toy_example.py', ['rules', '--ideal'], complete=False) is None


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_command_lines_parse(page):
    lines = command_lines(page.read_text(encoding='utf-8'))
    wrong = [f'{script} {" ".join(args)}  ->  {error}' for script, args, fenced in lines
             if (error := parse(script, args, complete=fenced)) is not None]
    assert not wrong, f'{page.relative_to(ROOT)} quotes command lines that do not parse:\n' + '\n'.join(wrong)


def test_every_page_with_commands_is_checked():
    """The front page and the guides do quote command lines (the extraction finds them)."""
    counts = {p.name: len(command_lines(p.read_text(encoding='utf-8'))) for p in PAGES}
    assert counts['README.md'] >= 10 and counts['toy.md'] >= 3 and counts['training.md'] >= 3, counts
