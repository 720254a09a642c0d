"""The download cache: a local path for a file or an http(s) URL, fetched once and checked by SHA-256.

Every file this project downloads (networks, detector weights, reference statistics) goes through
`fetch`. The cache folder is `$EDM2_CACHE_DIR` when set, else `~/.cache/edm2` (or the folder a
caller names); downloads land in its `downloads/` sub-folder under a name derived from the URL, are
written to a temporary name and renamed, so that several processes may fetch the same URL at once
and an interrupted download never looks complete.
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

__all__ = ['DownloadError', 'cache_root', 'fetch', 'sha256_of', 'is_url']


class DownloadError(EDM2Error):
    """A file or URL cannot be found, downloaded or verified; the message is one line naming it."""


def cache_root(cache_dir=None) -> pathlib.Path:
    """`cache_dir` if given, else $EDM2_CACHE_DIR, else ~/.cache/edm2."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get('EDM2_CACHE_DIR')
    return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'edm2'


def is_url(text) -> bool:
    return isinstance(text, str) and re.match(r'^https?://', text) is not None


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
            raise error(f'cannot fetch {what} {text}: {one_line(e)}') from None
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
    folder = cache_root(cache_dir) / 'downloads'
    base = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(urllib.parse.urlparse(text).path) or 'download')
    target = folder / f'{hashlib.sha256(text.encode()).hexdigest()[:16]}-{base}'
    if target.is_file():
        if sha256_prefix and not sha256_of(target).startswith(sha256_prefix.lower()):
            raise DownloadError(f'{text}: cached file {target} does not match SHA-256 prefix {sha256_prefix}; '
                                f'delete it to retry')
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f'{text}: cannot create cache folder {folder}: {one_line(e)}') from None
    remove_stale_temporaries(folder)  # downloads of killed processes
    try:
        with atomic_path(target) as tmp:
            _check_digest(_download(text, tmp, base), sha256_prefix, f'{text} (downloaded)')
    except OSError as e:
        raise DownloadError(f'{text}: cannot write {target}: {one_line(e)}') from None
    return target


def _download(url, dest, label) -> str:
    """Stream `url` into the file `dest`; return its hex SHA-256."""
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=60) as response, open_temporary(dest) as f:
            if response.status_code != 200:
                raise DownloadError(f'{url}: download failed with HTTP status {response.status_code}')
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
        raise DownloadError(f'{url}: download failed: {one_line(e)}') from None
    return digest.hexdigest()
