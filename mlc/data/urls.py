"""Where shards are and how to open them: local paths, file://, http(s)://, s3:// / gs:// (and
any other fsspec protocol: s3:// needs the s3 extra, gs:// the gcs extra), and ``pipe:``
commands. An `mlc shard` folder (its stats, classes.json, sizes.json) is read through
mlc.storage.Folder, so a dataset can be named by a local path or by any of these URLs.

A ``pipe:`` URL runs a shell command, so it is refused unless the caller allows it explicitly
(``allow_pipe=True``, the ``data.allow_pipe`` config key): shard lists and configs may come from
elsewhere, and a URL should not be able to run a program by default.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from mlc.extras import check_protocol
from mlc.format import OPENCLIP_SIZES_FILE, stats_name
from mlc.storage import Folder, open_input


class ShardOpenError(OSError):
    """A shard that could not be opened or read after the configured retries."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int  # from the dataset's stats (or sizes.json); needed to balance ranks


def expand(spec: str | list[str]) -> list[str]:
    """ "a-{000..009}.tar", "x.tar::y.tar", or a list of either -> the list of URLs."""
    items = spec if isinstance(spec, list) else spec.split("::")
    return [url for item in items for url in braceexpand(item.strip()) if url]


def read_dataset_json(dataset: str | Path, name: str):
    """A JSON file of an `mlc shard` folder (a local path or a URL: s3://, gs://, http(s)://,
    ...). A missing one is FileNotFoundError("LOCATION: no such file (is DATASET an `mlc
    shard` folder?)"); any other failure to read it (a host that does not answer, a refused
    request) is an OSError that names the file's location too."""
    folder = Folder(dataset)
    try:
        return folder.read_json(name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder.join(name)}: no such file (is {dataset} an `mlc shard` folder?)"
        ) from None
    except OSError as e:
        if folder.local or folder.join(name) in str(e):
            raise
        raise OSError(f"{folder.join(name)}: {e}") from e


def dataset_shards(dataset: str | Path, split: str) -> list[Shard]:
    """The shards of a split of an `mlc shard` folder (a local path or a URL: s3://, gs://,
    http(s)://, ...), with their sample counts. Shard URLs are the folder's location joined
    with the names in the stats: local folders give plain paths, as before."""
    stats = read_dataset_json(dataset, stats_name(split))
    folder = Folder(dataset)
    return [
        Shard(folder.join(shard), int(n))
        for shard, n in zip(stats["shards"], stats["shard_lengths"], strict=True)
    ]


def url_shards(spec: str | list[str], sizes: dict[str, int] | None = None) -> list[Shard]:
    """Shards given by URL. Sample counts come from ``sizes`` (URL or file name -> samples) or
    from the sizes.json beside the shards (OpenCLIP's size file), read once per folder, local
    or remote (http(s)://, s3://, ...; not beside pipe: commands).
    A protocol whose package is missing (s3:// without s3fs, ...) is an error here, once, not
    a skipped shard in every worker."""
    urls = expand(spec)
    first_of_protocol = {url.split("://", 1)[0]: url for url in reversed(urls)}
    for url in first_of_protocol.values():
        if _through_fsspec(url):
            check_protocol(url)
    sizes = dict(sizes or {})
    folders: dict[str, dict] = {}
    unreadable: dict[str, str] = {}  # folder -> why its sizes.json could not be read
    shards, missing = [], []
    for url in urls:
        count = sizes.get(url, sizes.get(os.path.basename(url)))
        if count is None and not url.startswith("pipe:"):
            if "://" in url and not url.startswith("file://"):
                folder = url.rpartition("/")[0]
            else:
                folder = os.path.dirname(url.removeprefix("file://")) or "."
            if folder not in folders:
                folders[folder] = _sizes_beside(folder, unreadable)
            count = folders[folder].get(url.rpartition("/")[2])
        if count is None:
            missing.append(url)
        else:
            shards.append(Shard(url, int(count)))
    if missing:
        why = "".join(f"; {folder}/{OPENCLIP_SIZES_FILE}: {e}" for folder, e in unreadable.items())
        raise ValueError(
            f"sample counts unknown for {len(missing)} shard(s) (e.g. {missing[0]}): give the "
            "dataset folder, or a sizes.json ({shard name: samples}) beside the shards" + why
        )
    return shards


def _sizes_beside(folder: str, unreadable: dict[str, str]) -> dict:
    """The sizes.json in ``folder`` ({shard name: samples}), or {} if there is none (an http
    server may answer 403, not 404, for a file it does not have, as S3 does over https to
    anyone who may not list the bucket). One that cannot be read (a host that does not answer)
    is {} too, and the reason goes into ``unreadable``: it is only needed when a shard's count
    is missing, and then the error says it."""
    try:
        return Folder(folder).read_json(OPENCLIP_SIZES_FILE)
    except FileNotFoundError:
        return {}
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403, 404, 410):
            unreadable[folder] = str(e)
        return {}
    except OSError as e:
        unreadable[folder] = str(e)
        return {}


def open_url(url: str, allow_pipe: bool = False):
    """A readable binary stream of the shard at ``url``."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ShardOpenError(
                f"refusing to run {url!r}: pipe: URLs run shell commands; set data.allow_pipe "
                "to true if this shard list is yours"
            )
        return _PipeStream(url[len("pipe:") :])
    return open_input(url)  # a path, file://, http(s):// or any fsspec protocol (mlc.storage)


def _through_fsspec(url: str) -> bool:
    """s3://, gs:// and any other protocol but file://, http(s):// and pipe:."""
    return "://" in url and not url.startswith(("file://", "http://", "https://", "pipe:"))


class _PipeStream:
    """stdout of a command, read to the end (a half-read pipe makes the writer fail: wds #411),
    and an error if the command fails."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE)  # noqa: S603

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self) -> None:
        self.proc.stdout.read()  # drain
        self.proc.stdout.close()
        if self.proc.wait() != 0:
            raise ShardOpenError(f"pipe:{self.command} exited with {self.proc.returncode}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_with_retries(url: str, retries: int, allow_pipe: bool = False, wait: float = 1.0):
    """open_url, retried ``retries`` times with growing waits; ShardOpenError after that."""
    for attempt in range(retries + 1):
        try:
            return open_url(url, allow_pipe)
        except ShardOpenError:
            raise
        except OSError as e:
            if attempt == retries:
                raise ShardOpenError(f"{url}: {e} (after {retries + 1} attempts)") from e
            time.sleep(wait * (attempt + 1))
    raise AssertionError("unreachable")
