"""Where an input lives: a local path, or a URL that fsspec opens (s3://, gs://, hf://, ...).

Manifests, folders, Parquet files, WebDataset shards and image references may all be
remote. A URL is handed to fsspec, which takes credentials from each filesystem's usual
configuration (for S3: the AWS environment variables, ``~/.aws``, an instance role;
``AWS_ENDPOINT_URL_S3`` or ``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible server); this
code never sees, logs or stores them, and the messages it makes name the URL only
without any ``user:password@`` part. fsspec is imported on the first remote input only.

``http(s)://`` image references are not read here: they keep their own path (passed
through, or downloaded with ``--fetch-urls``). A manifest or shard may be an http(s) URL.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["IMAGE_SCHEMES", "RemoteError", "display", "is_remote", "is_url", "join", "open_binary",
           "parent", "read_capped", "scheme", "url_fs", "size_of"]

# Object stores an image reference may name (read through fsspec and its filesystem
# package: s3fs, gcsfs, huggingface_hub, adlfs). Not every scheme fsspec knows: a local
# file is a path, and ftp://, memory://, ssh:// ... in a manifest are mistakes.
IMAGE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "hf", "az", "abfs", "abfss"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
BLOCK = 1 << 20  # read-ahead per remote file: one request per MiB, not fsspec's 5-50 MiB


class RemoteError(OSError):
    """A remote input could not be opened or read; the message names it and says why."""


def scheme(ref: str | Path) -> str | None:
    m = _SCHEME.match(str(ref))
    return m.group(1).lower() if m else None


def is_url(ref: str | Path) -> bool:
    return scheme(ref) is not None


def is_remote(ref: str | Path) -> bool:
    """A URL fsspec must open (not a plain path, not file://)."""
    return scheme(ref) not in (None, "file")


def display(ref: str | Path) -> str:
    """The reference as it may be shown: a URL without any credentials in it."""
    text = str(ref)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    if parts.password or parts.username:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return text


def join(base: str, rel: str) -> str:
    """``rel`` under the remote folder ``base`` (``s3://b/dir`` + ``a/x.jpg``)."""
    return base.rstrip("/") + "/" + rel.lstrip("/") if not is_url(rel) else rel


def parent(ref: str) -> str:
    """The folder of a remote file, as a URL."""
    head = _SCHEME.match(ref)
    assert head is not None
    rest = ref[head.end():]
    return ref[:head.end()] + posixpath.dirname(rest.rstrip("/"))


def url_fs(ref: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``ref`` and the path inside it."""
    try:
        import fsspec
    except ImportError:
        raise RemoteError(f"{display(ref)}: remote inputs need fsspec "
                          "(pip install fsspec s3fs)") from None
    try:
        fs, path = fsspec.core.url_to_fs(ref)
    except (ImportError, ValueError) as e:  # an unknown scheme, a missing s3fs/gcsfs
        raise RemoteError(f"{display(ref)}: {_reason(e)}") from None
    return fs, str(path)


def open_binary(ref: str | Path, block_size: int = BLOCK) -> IO[bytes]:
    """A binary file object for a local path or a URL (seekable for remote files)."""
    if not is_remote(ref):
        return open(_local(ref), "rb")  # noqa: SIM115 - the caller closes it
    fs, path = url_fs(str(ref))
    try:
        # A standard buffered reader over fsspec's file: readline(limit) for the line
        # readers (fsspec's own takes no limit), seek for tarfile and Parquet.
        return io.BufferedReader(fs.open(path, "rb", block_size=block_size),
                                 buffer_size=min(block_size, 1 << 20))
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such file or directory", display(ref)) from None
    except Exception as e:  # botocore, aiohttp, ...: one readable reason
        raise RemoteError(f"{display(ref)}: {_reason(e)}") from None


def size_of(ref: str) -> int | None:
    fs, path = url_fs(ref)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such file or directory", display(ref)) from None
    except Exception as e:
        raise RemoteError(f"{display(ref)}: {_reason(e)}") from None
    return int(size) if size is not None else None


def read_capped(ref: str, max_bytes: int) -> bytes:
    """A remote file's bytes, at most ``max_bytes`` (checked on its size first and then
    while reading: a file may grow); more raises ``ValueError`` with the size."""
    size = size_of(ref)
    if size is not None and size > max_bytes:
        raise ValueError(f"{size} bytes > {max_bytes}")
    with open_binary(ref, block_size=min(max_bytes + 1, 8 * BLOCK)) as f:
        try:
            data = f.read(max_bytes + 1)
        except Exception as e:
            raise RemoteError(f"{display(ref)}: {_reason(e)}") from None
    if len(data) > max_bytes:
        raise ValueError(f"more than {max_bytes} bytes")
    return data


def _local(ref: str | Path) -> str:
    text = str(ref)
    return text[len("file://"):] if text.startswith("file://") else os.fspath(ref)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"
