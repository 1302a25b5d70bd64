"""Local paths and object-store URLs (s3://, gs://, ...) for run folders, through pyarrow.fs.

Ray Train persists checkpoints to a run's storage path itself; this module covers the few other
files a run writes (resolved config, metrics log, exported model) so that they land next to the
checkpoints wherever those live. URLs may carry pyarrow's query options, e.g.
`s3://bucket/runs/a?endpoint_override=http://127.0.0.1:9000&scheme=http`.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from models.errors import UserError


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://...' paths other than file://."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def split_url(url: str) -> tuple[str, str]:
    """(url without its query, query) of a URL."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), parts.query


def join(base: str | os.PathLike, *names: str) -> str:
    """`base` / names for a local path or a URL (keeping the URL's query options at the end)."""
    if not is_url(base):
        return str(Path(base, *names))
    url, query = split_url(str(base))
    joined = "/".join([url.rstrip("/"), *names])
    return f"{joined}?{query}" if query else joined


def parent_and_name(path: str | os.PathLike) -> tuple[str, str]:
    """(parent, last component) of a local path or URL, e.g. for Ray's storage_path and run name."""
    if not is_url(path):
        p = Path(path).expanduser().resolve()
        return str(p.parent), p.name
    url, query = split_url(str(path))
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/"):
        raise UserError(f"{path}: a run URL needs a bucket and a folder name, e.g. s3://bucket/runs/my_run")
    return (f"{parent}?{query}" if query else parent), name


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or URL."""
    if not is_url(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    return pafs.FileSystem.from_uri(str(path))


def upload(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a local file or folder to `dest` (a local path or URL), replacing what is there."""
    if not is_url(dest):
        import shutil

        src, dst = Path(local), Path(dest)
        if src.resolve() == dst.resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        return
    fs, inner = filesystem(dest)
    if Path(local).is_dir():
        fs.create_dir(inner, recursive=True)
        pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    else:
        fs.create_dir(inner.rpartition("/")[0], recursive=True)
        pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder exists at a local path or URL."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str | os.PathLike) -> bytes:
    """The contents of a file at a local path or URL."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def sha256(path: str | os.PathLike, block: int = 8 << 20) -> str:
    """Hex SHA-256 of a file at a local path or URL, read in blocks (a large model is never held whole)."""
    import hashlib

    fs, inner = filesystem(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file at a local path or URL (local writes go through a temporary file and a rename)."""
    if not is_url(path):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    fs, inner = filesystem(path)
    fs.create_dir(inner.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)
