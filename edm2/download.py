"""The download cache: a local path for a file or an http(s) URL, fetched once and checked by SHA-256.

Every file this project downloads (networks, detector weights, reference statistics) goes through
`fetch`. The cache folder is `$EDM2_CACHE_DIR` when set, else `~/.cache/edm2` (or the folder a
caller names); a URL's file lives at `downloads/HOST/PATH` inside it (`cache_path`), so that a file
fetched elsewhere can be dropped in by hand: e.g. https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl
is `~/.cache/edm2/downloads/nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl`. Downloads are written
to a temporary name and renamed, so that several processes may fetch the same URL at once and an
interrupted download never looks complete. Offline, the error is one line naming that file and the
command that fetches it on a connected machine:

    python -m edm2.download fetch URL [URL ...] --to CACHE     # then copy CACHE to this machine's cache

(the command line lives in edm2/commands/download.py; this module imports no click).
"""

import hashlib
import os
import pathlib
import re
import urllib.parse

import requests
from tqdm import tqdm

from edm2 import distributed
from edm2.errors import EDM2Error, one_line
from edm2.fileio import atomic_path, open_temporary, remove_stale_temporaries

__all__ = ['DownloadError', 'cache_root', 'cache_path', 'fetch', 'sha256_of', 'is_url', 'local_file']


class DownloadError(EDM2Error):
    """A file or URL cannot be found, downloaded or verified; the message is one line naming it and, for a
    failed download, what to do (`remedy`); `reason` is the short cause alone."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


def cache_root(cache_dir=None) -> pathlib.Path:
    """`cache_dir` if given, else $EDM2_CACHE_DIR, else ~/.cache/edm2."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get('EDM2_CACHE_DIR')
    return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'edm2'


def is_url(text) -> bool:
    return isinstance(text, str) and re.match(r'^https?://', text) is not None


def _safe(part):
    return re.sub(r'[^A-Za-z0-9._-]', '_', part) or '_'


def cache_path(url, cache_dir=None) -> pathlib.Path:
    """Where `url`'s file lives in the cache: CACHE/downloads/HOST/PATH (each part reduced to letters,
    digits and ._-; a query string adds its own folder)."""
    parsed = urllib.parse.urlparse(url)
    parts = [_safe(p) for p in parsed.path.split('/') if p not in ('', '.', '..')] or ['download']
    if parsed.query:
        parts.insert(-1, _safe('query-' + parsed.query)[:100])
    return cache_root(cache_dir).joinpath('downloads', _safe(parsed.netloc), *parts)


def _legacy_cache_path(url, cache_dir=None) -> pathlib.Path:
    """The name edm2 0.1.0 cached a URL under (a hash of the URL and its file name), still read."""
    base = _safe(os.path.basename(urllib.parse.urlparse(url).path) or 'download')
    return cache_root(cache_dir) / 'downloads' / f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}'


def remedy(url, cache_dir=None) -> str:
    """What to do when `url` cannot be downloaded here: the file to place in the cache, or the command that
    fetches it on a connected machine, or a local path instead of the URL."""
    return (f'place the file at {cache_path(url, cache_dir)} (on a connected machine: python -m edm2.download '
            f'fetch {url} --to DIR, then copy DIR/downloads into {cache_root(cache_dir)}/downloads), or give '
            f'a local path instead of the URL')


def _reason(error) -> str:
    """A short cause of a failed request, instead of requests' nested retry message."""
    text = str(error)
    if isinstance(error, requests.Timeout):
        return 'timed out'
    if isinstance(error, requests.ConnectionError):
        if 'NameResolution' in text or 'Name or service not known' in text or 'getaddrinfo' in text:
            return 'host not found: offline or behind a firewall?'
        if 'refused' in text.lower():
            return 'connection refused'
        return 'no connection: offline or behind a firewall?'
    return one_line(error)


def sha256_of(path) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(digest, sha256_prefix, what):
    if sha256_prefix and not digest.startswith(sha256_prefix.lower()):
        raise DownloadError(f'{what}: SHA-256 {digest[:16]}... does not start with {sha256_prefix}')


def local_file(path_or_url, error=DownloadError, what='file') -> str:
    """A local path for a file or http(s) URL (downloaded once into the cache), or `error` (an exception
    class) with a one-line message naming `what` and the file."""
    text = str(path_or_url)
    if is_url(text):
        try:
            return str(fetch(text))
        except DownloadError as e:
            raise error(f'{what}: {one_line(e)}') from None
    if not os.path.isfile(text):
        raise error(f'{what} not found: {text}')
    if os.path.getsize(text) == 0:
        raise error(f'{what} {text}: empty file (0 bytes), e.g. left by an interrupted copy or download')
    return text


def fetch(url_or_path, cache_dir=None, sha256_prefix=None) -> pathlib.Path:
    """Local path of `url_or_path`.

    Local paths (and file:// URLs) must exist. http(s) URLs are downloaded once into
    `cache_root(cache_dir) / 'downloads'` with a progress bar on rank 0 and reused
    afterwards. With `sha256_prefix` the file's hex SHA-256 must start with it (checked on every call
    for local and cached files). Raises DownloadError.
    """
    text = str(url_or_path)
    if text.startswith('file://'):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    if not is_url(text):
        path = pathlib.Path(text).expanduser()
        if not path.is_file():
            raise DownloadError(f'{path}: no such file')
        if sha256_prefix:
            _check_digest(sha256_of(path), sha256_prefix, str(path))
        return path
    target = cache_path(text, cache_dir)
    for cached in (target, _legacy_cache_path(text, cache_dir)):
        if cached.is_file():
            if sha256_prefix and not sha256_of(cached).startswith(sha256_prefix.lower()):
                raise DownloadError(f'{text}: cached file {cached} does not match SHA-256 prefix {sha256_prefix}; '
                                    f'delete it to retry')
            return cached
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f'{text}: cannot create cache folder {folder}: {one_line(e)}') from None
    remove_stale_temporaries(folder)  # downloads of killed processes
    try:
        with atomic_path(target) as tmp:
            _check_digest(_download(text, tmp, target.name, cache_dir), sha256_prefix, f'{text} (downloaded)')
    except OSError as e:
        raise DownloadError(f'{text}: cannot write {target}: {one_line(e)}') from None
    return target


def _download(url, dest, label, cache_dir=None) -> str:
    """Stream `url` into the file `dest`; return its hex SHA-256."""
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=60) as response, open_temporary(dest) as f:
            if response.status_code != 200:
                reason = f'HTTP status {response.status_code}'
                raise DownloadError(f'cannot download {url} ({reason}); {remedy(url, cache_dir)}', reason)
            total = int(response.headers.get('content-length', 0)) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=f'Downloading {label}',
                      disable=not distributed.is_main(), leave=False) as bar:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise DownloadError(f'{url}: download incomplete, {f.tell()} of {total} bytes')
    except requests.RequestException as e:
        raise DownloadError(f'cannot download {url} ({_reason(e)}); {remedy(url, cache_dir)}', _reason(e)) from None
    return digest.hexdigest()


if __name__ == '__main__':  # `python -m edm2.download fetch URL --to DIR`: the command line is in edm2.commands
    from edm2.commands.download import cli
    cli(prog_name='python -m edm2.download')
