"""The documentation's links hold: every relative link and image path in README.md, CONTRIBUTING.md,
docs/*.md and tests/fixtures/README.md names a file or folder of the repository, and the front page stays
short."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / 'README.md', ROOT / 'CONTRIBUTING.md', ROOT / 'tests' / 'fixtures' / 'README.md',
                *(ROOT / 'docs').glob('*.md')])
# [text](target) and ![alt](target), with an optional "title"; <a href>/<img src> in HTML.
MARKDOWN_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HTML_LINK = re.compile(r'(?:href|src)="([^"]+)"')
FENCE = re.compile(r'^(```|~~~).*?^\1', re.S | re.M)


def relative_links(text):
    """Link targets outside code blocks and inline code that point into the repository (no scheme, no
    pure #anchor), without their #anchor."""
    text = FENCE.sub('', text)
    text = re.sub(r'`[^`\n]*`', '', text)
    targets = MARKDOWN_LINK.findall(text) + HTML_LINK.findall(text)
    out = []
    for target in targets:
        if re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*:', target) or target.startswith('#'):
            continue
        out.append(target.split('#')[0])
    return out


def test_link_extraction():
    text = ('[a](docs/x.md) ![i](fig.png "title") [web](https://example.org) [here](#anchor) '
            '[sec](y.md#part) `[not](code.md)` <img src="z.png">\n```\n[no](fenced.md)\n```\n')
    assert relative_links(text) == ['docs/x.md', 'fig.png', 'y.md', 'z.png']


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    assert page.is_file(), f'{page.relative_to(ROOT)} is missing'
    missing = [t for t in relative_links(page.read_text(encoding='utf-8')) if not (page.parent / t).exists()]
    assert not missing, f'{page.relative_to(ROOT)} links to files that do not exist: {missing}'


def test_readme_is_a_front_page():
    lines = (ROOT / 'README.md').read_text(encoding='utf-8').count('\n')
    assert lines <= 250, f'README.md has {lines} lines; move detail to a page in docs/'
