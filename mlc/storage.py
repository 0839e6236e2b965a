"""Folders wherever a dataset lives: a local path, file://, s3://, gs://, memory://, any other
fsspec protocol, and http(s):// for reading only.

A local folder keeps mlc.io's atomic writes: a temporary name in the same folder, fsync, rename.
An object store has no rename, but it needs none: an object appears whole when its upload
completes (one PUT, or a multipart upload's completion) and never in part, so a file is written
straight to its final name, and a write that fails is discarded, never completed. Either way a
reader sees the whole file or none.

Credentials, endpoints and other settings come from each protocol's own configuration (for
s3:// the AWS variables and files, AWS_ENDPOINT_URL for an S3-compatible server; fsspec's
FSSPEC_<PROTOCOL>_<OPTION> variables for any protocol), as with every other fsspec user.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from mlc.extras import check_protocol
from mlc.io import Classes, atomic_writer, read_classes

READ_ONLY_PROTOCOLS = ("http", "https")
# Object stores whose fsspec files upload as they are written and publish the object only on
# close (a multipart upload's completion), and can discard an unfinished upload.
UPLOADING_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az")


class StorageError(OSError):
    """A location that cannot be used as asked; the message, one line, names it and says why."""


def protocol(location: str | Path) -> str:
    """ "s3" for s3://bucket/x; "file" for a local path or file:// URL."""
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def is_local(location: str | Path) -> bool:
    return protocol(location) == "file"


def local_path(location: str | Path) -> Path:
    """The path of a local location (a plain path or a file:// URL)."""
    return Path(str(location).removeprefix("file://"))


def join(location: str | Path, *names: str) -> str:
    """``location/name/...`` as text: a path for local locations, a URL otherwise."""
    if is_local(location):
        return str(local_path(location).joinpath(*names))
    return "/".join([str(location).rstrip("/"), *names])


def _filesystem(url: str):
    import fsspec  # imported here: local folders, the common case, do not need it

    check_protocol(url)
    return fsspec.core.url_to_fs(url)


class Folder:
    """A folder by path or URL, with the few operations mlc needs: read, write (atomically, see
    the module's docstring), list, move, remove. Names are relative to the folder and use "/"."""

    def __init__(self, location: str | Path):
        text = str(location)
        self.protocol = protocol(text)
        self.local = self.protocol == "file"
        self.http = self.protocol in READ_ONLY_PROTOCOLS
        self.fs = self.path = None
        if self.local:
            self.path = local_path(text)
            self.url = self.root = str(self.path)
        elif self.http:  # through urllib: reading needs no package beyond the standard library
            self.url = self.root = text.rstrip("/")
        else:
            self.url = text.rstrip("/")
            self.fs, root = _filesystem(self.url)
            self.root = root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def join(self, *names: str) -> str:
        """The location of a file or folder inside, as a path or URL (for messages and shard
        lists)."""
        return join(self.url, *names)

    def child(self, *names: str) -> Folder:
        return Folder(self.join(*names))

    @property
    def name(self) -> str:
        """The folder's own name: its last path segment ("ds" for s3://bucket/ds)."""
        return self.path.name if self.local else self.url.rsplit("/", 1)[-1]

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _fresh(self, key: str) -> None:
        """Forget cached listings of ``key`` and the folders above it (s3fs and others cache
        them; another process, or this one through another instance, may have written since)."""
        self.fs.invalidate_cache(key)

    # ---------------------------------------------------------------- reading

    def _head(self, name: str):
        """The response to an HTTP HEAD request for ``name``; None if it is not there."""
        request = urllib.request.Request(self._key(name), method="HEAD")
        try:
            return urllib.request.urlopen(request, timeout=60)  # noqa: S310 (http(s) only)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def is_file(self, name: str) -> bool:
        if self.local:
            return (self.path / name).is_file()
        if self.http:
            return self._head(name) is not None
        self._fresh(self._key(name))
        return self.fs.isfile(self._key(name))

    def exists(self) -> bool:
        """Whether the folder holds anything (object stores have no empty folders)."""
        if self.local:
            return self.path.is_dir()
        if self.http:
            raise StorageError(f"{self.url}: an http(s):// folder cannot be listed")
        self._fresh(self.root)
        return self.fs.exists(self.root)

    def size(self, name: str) -> int:
        if self.local:
            return (self.path / name).stat().st_size
        if self.http:
            response = self._head(name)
            if response is None:
                raise FileNotFoundError(f"{self.join(name)}: no such file")
            return int(response.headers["Content-Length"])
        self._fresh(self._key(name))
        return int(self.fs.size(self._key(name)))

    def open(self, name: str, mode: str = "rb"):
        """A file object for reading; FileNotFoundError naming the location if missing."""
        if "r" not in mode:
            raise ValueError("Folder.open reads; use writer() to write")
        try:
            if self.local:
                return (self.path / name).open(mode)
            if self.http:
                stream = urllib.request.urlopen(self._key(name), timeout=60)  # noqa: S310
                return stream if "b" in mode else io.TextIOWrapper(stream, encoding="utf-8")
            self._fresh(self._key(name))
            return self.fs.open(self._key(name), mode)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(name)}: no such file") from None
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{self.join(name)}: no such file") from None
            raise

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files directly inside (those starting with ``prefix``), sorted."""
        if self.local:
            if not self.path.is_dir():
                return []
            return sorted(p.name for p in self.path.iterdir() if p.name.startswith(prefix))
        if self.http:
            raise StorageError(f"{self.url}: an http(s):// folder cannot be listed")
        self._fresh(self.root)
        if not self.fs.exists(self.root):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return sorted(n for n in names if n.startswith(prefix))

    def sizes(self) -> dict[str, int]:
        """{name: size in bytes} of the files directly inside (not of subfolders), from one
        listing: on an object store one request per 1,000 files, where asking each file's size
        is one request per file."""
        if self.local:
            if not self.path.is_dir():
                return {}
            return {
                entry.name: entry.stat().st_size
                for entry in os.scandir(self.path)
                if entry.is_file()
            }
        if self.http:
            raise StorageError(f"{self.url}: an http(s):// folder cannot be listed")
        self._fresh(self.root)
        if not self.fs.exists(self.root):
            return {}
        return {
            entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"])
            for entry in self.fs.ls(self.root, detail=True)
            if entry.get("type") == "file"
        }

    def read_many(self, names: list[str]) -> dict[str, bytes | OSError]:
        """The contents of several files, each as bytes or as the OSError reading it raised
        (FileNotFoundError for a missing one). An object store reads them concurrently."""
        if self.local or self.http or len(names) < 2:
            out: dict[str, bytes | OSError] = {}
            for name in names:
                try:
                    out[name] = self.read_bytes(name)
                except OSError as e:
                    out[name] = e
            return out
        keys = [self._key(name) for name in names]
        for key in keys:
            self._fresh(key)
        found = self.fs.cat(keys, on_error="return")
        out = {}
        for name, key in zip(names, keys, strict=True):
            value = found.get(key, FileNotFoundError(f"{self.join(name)}: no such file"))
            if isinstance(value, FileNotFoundError):
                value = FileNotFoundError(f"{self.join(name)}: no such file")
            elif isinstance(value, Exception) and not isinstance(value, OSError):
                value = OSError(f"{self.join(name)}: {value}")
            out[name] = value
        return out

    # ---------------------------------------------------------------- writing

    def require_writable(self) -> None:
        """StorageError unless files can be written here (http(s):// is read-only); called
        before any work starts."""
        if self.protocol in READ_ONLY_PROTOCOLS:
            raise StorageError(
                f"{self.url}: {self.protocol}:// locations are read-only; write to a local "
                "folder or an object store (s3://, gs://, ...)"
            )

    def makedirs(self, name: str = "") -> None:
        """Create the folder (or the subfolder ``name``) on a local file system."""
        if self.local:
            (self.path / name).mkdir(parents=True, exist_ok=True)
        # object stores: a "folder" exists once an object is written under it

    @contextlib.contextmanager
    def writer(self, name: str, durable: bool = True):
        """A binary file object for ``name``: the file appears whole when the block ends
        without an error, and not at all when it raises. ``durable`` as in mlc.io.atomic_writer
        (local folders; an object store's completed upload is durable)."""
        self.require_writable()
        if self.local:
            with atomic_writer(self.path / name, durable=durable) as f:
                yield f
            return
        if self.protocol in UPLOADING_PROTOCOLS:
            f = self.fs.open(self._key(name), "wb")
            try:
                yield f
            except BaseException:
                f.discard()  # the upload is abandoned: nothing appears under the name
                f.closed = True  # (close() would otherwise upload the buffer after all)
                raise
            f.close()
            return
        # Other file systems may show a file while it is written: write a local temporary
        # file, then copy it in one call.
        with tempfile.NamedTemporaryFile(prefix="mlc-upload-") as f:
            yield f
            f.flush()
            self.fs.put_file(f.name, self._key(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as f:
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, data, indent: int | None = 1, **kwargs) -> None:
        self.write_text(name, json.dumps(data, indent=indent, **kwargs) + "\n")

    def move(self, source: str, target: str) -> None:
        """Rename ``source`` to ``target`` inside the folder (an object store copies on the
        server, then deletes the source: ``target`` appears whole)."""
        if self.local:
            os.replace(self.path / source, self.path / target)
        elif self.protocol in UPLOADING_PROTOCOLS:
            # one copy request and one delete (fs.mv first lists both names as folders)
            self.fs.cp_file(self._key(source), self._key(target))
            self.fs.rm_file(self._key(source))
        else:
            self.fs.mv(self._key(source), self._key(target))

    def remove(self, name: str) -> None:
        """Remove a file if it is there."""
        if self.local:
            (self.path / name).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._key(name))


class RemoteFile:
    """An input file by URL, read whole into memory on first use, with the few methods of a
    Path that the sources use (name, suffix, is_file, open and read_bytes for reading);
    str() is the URL. For inputs a source reads whole anyway (a table, a COCO JSON); large
    CSVs are streamed with open_input instead."""

    def __init__(self, url: str):
        self.url = str(url)
        self._data: bytes | None = None

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteFile({self.url!r})"

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def is_file(self) -> bool:
        return self._data is not None or input_is_file(self.url)

    def read_bytes(self) -> bytes:
        if self._data is None:
            with open_input(self.url) as f:
                self._data = f.read()
        return self._data

    def open(self, mode: str = "rb"):
        stream = io.BytesIO(self.read_bytes())
        return stream if "b" in mode else io.TextIOWrapper(stream, encoding="utf-8")


def input_path(location: str | Path) -> Path | RemoteFile:
    """An input file as a Path (a local one, as before URLs were accepted) or a RemoteFile."""
    return local_path(location) if is_local(location) else RemoteFile(str(location))


def input_is_file(location: str | Path) -> bool:
    """Whether an input file given by path or URL is there."""
    if is_local(location):
        return local_path(location).is_file()
    parent, _, name = str(location).rstrip("/").rpartition("/")
    return Folder(parent).is_file(name)


@contextlib.contextmanager
def input_source(location: str | Path):
    """What pyarrow's readers take for an input file: a local file's path (as before URLs were
    accepted), or a URL's file object, open for the block."""
    if is_local(location):
        yield local_path(location)
        return
    with open_input(location) as f:
        yield f


def read_input_classes(location: str | Path) -> Classes:
    """mlc.io.read_classes for a class list given by path or URL."""
    if is_local(location):
        return read_classes(local_path(location))
    with open_input(location) as f:
        return read_classes(str(location), data=f.read())


def open_input(location: str | Path, mode: str = "rb"):
    """An input file (a label CSV, a class list, an image) by path or URL, for reading."""
    if is_local(location):
        path = local_path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{location}: no such file")
        return path.open(mode)
    parent, _, name = str(location).rstrip("/").rpartition("/")
    return Folder(parent).open(name, mode)


def require_local(location: str | Path, what: str) -> None:
    """StorageError unless ``location`` is a plain local path. For outputs that are written
    only to local files (a training run's folder, a report, a predictions file): a URL there
    would otherwise become folders named after it under the current directory (./s3:/...).
    Called before any work starts."""
    text = str(location)
    if "://" in text:
        plain = " (without file://)" if protocol(text) == "file" else ""
        raise StorageError(
            f"{what} {text}: this output is written to a local folder, not to a URL: give a "
            f"local path{plain}, and copy the result where it should go afterwards"
        )
