"""Webdataset tar shards from anywhere `fsspec` reads (local paths, globs, brace ranges, `https://`, `hf://`, `s3://`
...) or a shell command writes (webdataset's `pipe:` URLs), read with integrity checks and counted without reading
them in full.

- `resolve_shards` expands brace ranges (`shards/{0000..0099}.tar`, `{a,b}`), directories and globs (local, or remote
  on filesystems that list, such as `hf://`/`s3://`); plain URLs are kept as they are (`https://`), and so are `pipe:`
  commands (`pipe:curl -sfL https://host/{00000..00099}.tar`: braces expand, one command per shard).
- A `pipe:COMMAND` shard is the standard output of `COMMAND` run by the shell, read as it is written. A command that
  fails before writing anything is a missing shard (FileNotFoundError naming the command, its exit status and the end
  of its stderr); one that fails later is a truncated shard (the samples before are kept, the loss is counted). Its
  name (the `shard.tar` of keys) is the last argument that ends like a tar file, and its sidecar is the one beside
  that argument when fsspec reads it (a path or URL); without one it is counted by one sequential read.
- `iter_shard_samples` yields the samples (`KEY.ext` files sharing a key) of one shard in a single sequential read
  (tar stream mode: works over HTTP without range requests). A shard cut inside a file's data, cut inside a tar header,
  ending without the end-of-archive marker, or with a corrupt header ends at the last complete sample with a warning
  naming the shard and the number of samples lost (`strict=True`: `InvalidPairError`). A sample whose file data is cut
  is lost; at a damaged header the sample being read is kept (its files were read whole; validation catches a
  missing image or caption). How many samples followed is known only from a sidecar count, else reported as "at
  least 1".
- `shard_count` counts a shard's samples: from an img2dataset sidecar (`NAME_stats.json`, its `successes`) when
  there is one (nothing else is read), else by a seekable tar header scan of a local file (512 bytes per file of the
  shard), else (a URL) by one sequential read. Counts are cached per process, and only the shards before the ones a
  process reads are counted.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger("trainers.data.pairs")

SIDECAR_SUFFIX = "_stats.json"
_KEY_PATTERN = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/000012.jpg" -> ("dir/000012", "jpg")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_SCAN_BLOCK_SIZE = 1 << 13  # block size of seekable remote reads
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PIPE_PREFIX = "pipe:"


class ShardError(ValueError):
    """A webdataset shard is truncated or corrupt and `strict=True` was asked for (re-raised as `InvalidPairError`)."""


def is_pipe(path: str) -> bool:
    """Whether `path` is a webdataset `pipe:COMMAND` shard (the command's standard output)."""
    return str(path).startswith(PIPE_PREFIX)


def is_remote(path: str) -> bool:
    """Whether `path` is read as a stream rather than a local file: a URL for fsspec (`https://...`, `hf://...`,
    `s3://...`) or a `pipe:` command."""
    return is_pipe(path) or ("://" in str(path) and not str(path).startswith("file://"))


def expand_braces(pattern: str) -> list[str]:
    """Expand brace ranges and lists the way a shell does: `a{00..02}b` -> `a00b a01b a02b` (zero padding kept when the
    bounds are written with it), `{x,y}` -> `x y`; several braces multiply. A brace with neither stays as it is."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    range_match = _RANGE.match(body)
    if range_match:
        first, last = range_match.groups()
        width = max(len(first), len(last)) if first.lstrip("-").startswith("0") or last.lstrip("-").startswith("0") else 0
        start, stop = int(first), int(last)
        step = 1 if stop >= start else -1
        items = [str(value).zfill(width) for value in range(start, stop + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + expanded for expanded in expand_braces(tail)]
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def _has_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def resolve_shards(data_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a directory (all `*.tar*` inside), a glob, a brace range, a URL or a list of those into a list of shards
    (each pattern's matches sorted; the patterns in the order given). FileNotFoundError names a pattern with none."""
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    shards: list[str] = []
    for pattern in itertools.chain.from_iterable(expand_braces(str(p)) for p in patterns):
        if is_pipe(pattern):
            found = [pattern]
        elif is_remote(pattern):
            if _has_glob(pattern):
                import fsspec

                protocol = pattern.split("://", 1)[0]
                if protocol in ("http", "https"):  # fsspec would scrape an HTML index page, if the server has one
                    raise ValueError(
                        f"Cannot list {pattern!r}: {protocol}:// URLs have no glob; give the shards as a brace range "
                        "such as 'https://host/shards/{00000..00099}.tar'."
                    )
                fs, _ = fsspec.core.url_to_fs(pattern)
                found = sorted(fs.glob(pattern))
                found = [path if "://" in path else f"{protocol}://{path}" for path in found]
            else:
                found = [pattern]
        elif os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.tar*")))
        elif _has_glob(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        found = [path for path in found if not path.endswith(SIDECAR_SUFFIX)]
        if not found:
            raise FileNotFoundError(
                f"No webdataset tar shards found for {pattern!r} (a directory, a glob, a brace range, a file or a URL)."
            )
        shards.extend(found)
    return shards


def tar_argument(shard: str) -> str:
    """The tar file a `pipe:` command reads: its last argument that ends like a tar file (else its last argument);
    any other shard is its own."""
    if not is_pipe(shard):
        return shard
    words = shlex.shlex(shard[len(PIPE_PREFIX):], posix=True, punctuation_chars=True)
    words.whitespace_split = True  # split at blanks and `;|&()<>` only: a URL stays whole
    arguments = list(words) or [shard]
    return next((arg for arg in reversed(arguments) if arg.endswith(_TAR_SUFFIXES)), arguments[-1])


def shard_name(shard: str) -> str:
    """The shard's file name (`00012.tar`); for a `pipe:` command, that of its tar argument."""
    return tar_argument(shard).rstrip("/").rsplit("/", 1)[-1]


class CommandOutput(io.RawIOBase):
    """The standard output of a `pipe:` shard's shell command, read as the command writes it.

    At the end of the output the command's exit status is checked. A failure before any byte is a FileNotFoundError
    naming the command, its status and the end of its stderr. A later failure ends the output where it stopped, so the
    tar reader finds the cut and counts the samples lost, as for a truncated file; the status is logged beside it.
    Closing before the end stops the command.
    """

    def __init__(self, shard: str):
        self.command = shard[len(PIPE_PREFIX):]
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a talkative command cannot block on it
        # Unbuffered: a read returns what the command wrote so far. Its own session: closing stops all it started.
        self._process = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                         bufsize=0, start_new_session=True)
        self._bytes_read = 0
        self._finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = self._process.stdout.readinto(buffer)
        self._bytes_read += size
        if size == 0 and not self._finished:
            self._finished = True
            status = self._process.wait()
            if status != 0:
                self._stderr.seek(0)
                stderr = self._stderr.read().decode("utf-8", "replace").strip()[-500:]
                message = (f"pipe: shard command {self.command!r} exited with status {status} after "
                           f"{self._bytes_read} bytes" + (f": {stderr}" if stderr else ""))
                if self._bytes_read == 0:
                    raise FileNotFoundError(message)
                logger.warning(message)
        return size

    def close(self) -> None:
        if not self.closed:
            self._process.stdout.close()
            if self._process.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it may end in between
                    os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._stderr.close()
        super().close()


def _open(shard: str, *, seekable: bool):
    if is_pipe(shard):
        return CommandOutput(shard)
    if not is_remote(shard):
        return open(shard.removeprefix("file://"), "rb")
    import fsspec

    if seekable:
        options = {"block_size": _SCAN_BLOCK_SIZE, "cache_type": "readahead"}
    elif shard.split("://", 1)[0] in ("http", "https"):
        options = {"block_size": 0}  # one plain GET, read as it arrives: no range requests needed
    else:
        options = {}
    return fsspec.open(shard, "rb", **options).open()


def sidecar_path(shard: str) -> str | None:
    """img2dataset's per-shard statistics file: `00000.tar` -> `00000_stats.json`; for a `pipe:` command, the one
    beside its tar argument (`pipe:curl -sfL https://host/00000.tar` -> `https://host/00000_stats.json`), or None when
    it names no tar file."""
    source = tar_argument(shard)
    for suffix in _TAR_SUFFIXES:
        if source.endswith(suffix):
            return source[: -len(suffix)] + SIDECAR_SUFFIX
    return None if is_pipe(shard) else source + SIDECAR_SUFFIX


def sidecar_count(shard: str) -> int | None:
    """The shard's sample count from its img2dataset `_stats.json` (`successes`), or None when there is none. A `pipe:`
    command's sidecar (`sidecar_path`) is read directly, when it is a path or a URL fsspec reads."""
    path = sidecar_path(shard)
    try:
        if path is None or (not is_remote(path) and not os.path.isfile(path)):
            return None
        with _open(path, seekable=False) as file:
            stats = json.loads(file.read().decode("utf-8"))
    except Exception as error:  # a sidecar is a shortcut: without its count the shard is counted
        # Quietly for a 404 or a protocol only a pipe's command reads (`s3://` without s3fs); else a refused request
        # or a broken file, said.
        if not isinstance(error, (FileNotFoundError, ImportError)):
            logger.warning("Ignoring the sidecar %s: %s", path, error)
        return None
    for key in ("successes", "num_samples", "count"):
        if isinstance(stats.get(key), int) and stats[key] >= 0:
            return stats[key]
    return None


def _checked_tarinfo(ending: dict[str, str]) -> type[tarfile.TarInfo]:
    """A TarInfo class that records why an archive ended when tarfile itself would end silently: a header cut short,
    a corrupt header, or the end of the file where the end-of-archive marker should be."""

    class CheckedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            try:
                return super().fromtarfile(tar)
            except tarfile.TruncatedHeaderError:
                ending["problem"] = "cut inside a tar header"
                raise
            except tarfile.InvalidHeaderError as error:
                ending["problem"] = f"corrupt tar header ({error})"
                raise
            except tarfile.EmptyHeaderError:
                ending["problem"] = "no end-of-archive marker: the file ends at a header boundary"
                raise

    return CheckedTarInfo


# Shards whose truncation was already logged by this process (streaming re-reads a shard every epoch).
_warned: set[str] = set()


def iter_shard_samples(
    shard: str,
    *,
    read_data: bool = True,
    strict: bool = False,
    expected: int | None = None,
    seekable: bool = False,
    on_loss: Any = None,
    warn: bool = True,
) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Yield `(key, {extension: bytes})` for each complete sample of a tar shard.

    `read_data=False, seekable=True` is the header scan (data is seeked over, not read; a `pipe:` shard is read in
    order whatever `seekable` says). On a truncated or corrupt shard the samples before the damage are yielded, then a
    warning names the shard and the samples lost (`expected` − complete when the count is known, else "at least 1"),
    `on_loss(lost, message)` is called, and with `strict=True` a `ShardError` is raised instead. Reading and scanning
    stop at the same sample.
    """
    seekable = seekable and not is_pipe(shard)  # a command's output is read once, in order
    ending: dict[str, str] = {}
    key, fields, complete = None, {}, 0
    try:
        with _open(shard, seekable=seekable) as file, tarfile.open(
            fileobj=file, mode="r:*" if seekable else "r|*", tarinfo=_checked_tarinfo(ending)
        ) as tar:
            for member in tar:
                match = _KEY_PATTERN.match(member.name)
                if not member.isfile() or match is None:
                    continue
                member_key, extension = match.group(1), match.group(2).lower()
                if key is not None and member_key != key:
                    complete += 1
                    yield key, fields
                    fields = {}
                key = member_key
                fields[extension] = tar.extractfile(member).read() if read_data else None
    except FileNotFoundError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        if "problem" not in ending:  # cut inside a file's data: the sample being read is incomplete
            ending["problem"], key = f"{type(error).__name__}: {error}", None
    if key is not None:
        # Every file of the sample being read is complete (a damaged header ends the shard *between* files); if a
        # file of it was lost with the damage, validation finds the missing image or caption.
        complete += 1
        yield key, fields
    if "problem" not in ending:
        if expected is not None and complete != expected:
            _report(shard, f"{complete} samples where its sidecar count says {expected}", complete, expected, strict,
                    on_loss, warn, lost=max(0, expected - complete))
        return
    lost = max(0, expected - complete) if expected is not None else 1
    _report(shard, ending["problem"], complete, expected, strict, on_loss, warn, lost=lost)


def _report(shard, problem, complete, expected, strict, on_loss, warn, *, lost) -> None:
    if expected is not None:
        lost_text = f"{lost} of its {expected} samples lost (sidecar count)"
    else:
        lost_text = (f"at least {lost} sample lost (the damaged one; without a {SIDECAR_SUFFIX} sidecar the "
                     "samples after it cannot be counted)")
    message = f"Webdataset shard {shard} is truncated or corrupt ({problem}): {complete} complete samples read, {lost_text}."
    if strict:
        raise ShardError(message + " Pass strict=False to train on the samples before the damage.")
    if on_loss is not None and lost:
        on_loss(lost, message)
    if warn and shard not in _warned:
        _warned.add(shard)
        logger.warning(message)


@functools.lru_cache(maxsize=65536)
def shard_count(shard: str, strict: bool = False) -> int:
    """The number of complete samples of `shard` (cached): its sidecar count, else a seekable header scan of a local
    file (about 40 us per file of the shard, whatever its size), else, for a URL, one sequential read that discards the
    data (a header scan over HTTP would cost one range request per sample, slower than the read; with a warning that
    says to add sidecars)."""
    count = sidecar_count(shard)
    if count is not None:
        return count
    if is_remote(shard):
        logger.warning("No %s sidecar for %s: counting its samples (for the stable indices of the shards after it) by "
                       "reading it once.%s", SIDECAR_SUFFIX, shard,
                       "" if sidecar_path(shard) is None else " img2dataset's sidecars make this unnecessary.")
        return sum(1 for _ in iter_shard_samples(shard, read_data=False, strict=strict, warn=False))
    return sum(1 for _ in iter_shard_samples(shard, read_data=False, seekable=True, strict=strict, warn=False))


def shard_offset(shards: Sequence[str], position: int, strict: bool = False) -> int:
    """The first stable index of `shards[position]`: the sample count of the shards before it."""
    return sum(shard_count(shard, strict) for shard in shards[:position])
