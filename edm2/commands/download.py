"""The download command: fetch published files into a cache folder on a connected machine, to copy to one
that is offline.

    python -m edm2.download fetch URL [URL ...] --to DIR     # DIR/downloads/HOST/PATH, as edm2's cache
    python -m edm2.download where URL                        # where this machine's cache expects URL's file

Copy DIR/downloads into the offline machine's cache folder ($EDM2_CACHE_DIR, else ~/.cache/edm2): every
command then finds the files without a network. The URLs of the presets are in configs/generate.toml and
configs/networks.toml; the reference statistics' under `calculate_metrics.py ref --help`.
"""

import click

from edm2.commands.cli import Group, fail
from edm2.download import DownloadError, cache_path, fetch, is_url


@click.group(cls=Group, help=__doc__)
def cli():
    pass


def _urls(urls):
    for url in urls:
        if not is_url(url):
            raise click.BadParameter(f'expected an http(s) URL, got {url!r}', param_hint='URL')
    return urls


@cli.command('fetch')
@click.argument('urls', nargs=-1, required=True, metavar='URL...')
@click.option('--to', 'to', required=True, type=click.Path(file_okay=False),
              help='Cache folder to fill (created if missing); the files land in DIR/downloads/HOST/PATH.')
def fetch_cmd(urls, to):
    """Download each URL into the cache folder DIR (skipping those already there)."""
    for url in _urls(urls):
        try:
            click.echo(fetch(url, cache_dir=to))
        except DownloadError as e:
            fail(e)


@cli.command('where')
@click.argument('urls', nargs=-1, required=True, metavar='URL...')
def where_cmd(urls):
    """Print where this machine's cache expects each URL's file (place it there by hand)."""
    for url in _urls(urls):
        click.echo(cache_path(url))


def main():
    cli(prog_name='python -m edm2.download')


if __name__ == '__main__':
    main()
