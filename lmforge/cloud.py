"""Paths that are URLs (``s3://bucket/key``, ``gs://...``, any fsspec protocol): data sources, the base model,
``train.output_dir``, and the inputs and outputs of generate and eval.

fsspec does the transfers (its filesystem for each protocol is an optional extra: ``lmforge[cloud]`` for
s3:// and gs://, ``lmforge[azure]`` for az:// and abfs://, ``lmforge[hdfs]`` for hdfs://), with the standard configuration
(for S3 the AWS environment variables including ``AWS_ENDPOINT_URL``, and profiles). What lmforge adds:

  * **Inputs are copied once into the lmforge cache**, keyed by the URL and the objects' ETags (or sizes and
    modification times), so a base model or a dataset is downloaded once and a changed object is fetched
    again. The rest of lmforge then reads local files.
  * **An output_dir URL trains in a local mirror** (``<cache>/outputs/<hash>``), one on each node: every
    rank writes its part of a checkpoint (its shards, optimizer state, RNG) into its node's mirror, each
    node uploads the files its ranks wrote, and once every node has, global rank 0 writes the marker
    (``.lmforge-complete``), last: a partial upload (a killed job, a lost connection, one node's part
    missing) is never taken for complete. So nodes need no shared disk. ``train.resume: auto`` takes the
    newest complete checkpoint in the bucket (global rank 0 decides, every rank follows), each node
    downloads it whole into its mirror, and the run continues bitwise as from a local checkpoint.
  * ``file://`` URLs go the same way (a mounted bucket, or a test of these code paths without a server).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from lmforge.cache import cache_root
from lmforge.errors import ConfigError

MARKER = ".lmforge-complete"  # written last into an uploaded checkpoint or final model
MIRROR = ".lmforge-remote.json"  # in a local mirror: the output_dir URL it uploads to
STAGING = ".staging"  # in a run directory: checkpoints, final models and downloads assembled before a rename
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


# protocol -> (the package its fsspec filesystem needs, what installs it)
_CLOUD = ("s3fs", "pip install 'lmforge[cloud]'")
_GCS = ("gcsfs", "pip install 'lmforge[cloud]'")
_AZURE = ("adlfs", "pip install 'lmforge[azure]'")
_HDFS = ("pyarrow", "pip install 'lmforge[hdfs]', and a Java runtime with libhdfs (HADOOP_HOME)")
PACKAGES = {"s3": _CLOUD, "s3a": _CLOUD, "gs": _GCS, "gcs": _GCS, "az": _AZURE, "abfs": _AZURE, "abfss": _AZURE,
            "adl": _AZURE, "hdfs": _HDFS, "arrow_hdfs": _HDFS}


def is_remote(path: str | os.PathLike | None) -> bool:
    """A URL that fsspec reads (``s3://``, ``gs://``, ``file://``, ...), as opposed to a plain local path."""
    return path is not None and bool(_URL.match(str(path)))


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; a clear error naming the package when its protocol's
    filesystem is not installed. Credentials come from the protocol's own configuration (environment
    variables, profiles), never from lmforge's config."""
    import fsspec

    kwargs = {}
    if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        # fsspec reuses a filesystem made with the same arguments: with the endpoint among them, a changed
        # AWS_ENDPOINT_URL gets a new client instead of one still talking to the old endpoint
        kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    proto = protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError:
        package, install = PACKAGES.get(proto, (None, None))
        what = f"the package {package}, which is not installed: {install}" if package else \
            "an fsspec filesystem package that is not installed (see fsspec's list of implementations)"
        raise ConfigError(f"{url}: the {proto}:// protocol needs {what}") from None
    except ValueError as e:
        raise ConfigError(f"{url}: no fsspec filesystem knows the protocol {proto}:// ({e})") from None
    except OSError as e:  # e.g. hdfs:// without a Java runtime, or an unreachable name node
        hint = f" ({proto}:// needs {PACKAGES[proto][1].removeprefix('pip install ')})" if proto in PACKAGES else ""
        raise ConfigError(f"{url}: cannot open the {proto}:// filesystem: {str(e).splitlines()[0]}{hint}") from None
    fs.invalidate_cache()  # listings cached by fsspec miss what other processes (ranks, reruns) wrote
    return fs, path


def _versions(fs, paths: list[str]) -> str:
    """What identifies the objects' current contents: ETags where the store has them, else size + mtime."""
    parts = []
    for p in sorted(paths):
        info = fs.info(p)
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or \
            f"{info.get('size')}:{info.get('LastModified') or info.get('mtime') or info.get('updated')}"
        parts.append(f"{p}={tag}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def fetch(url: str, what: str) -> Path:
    """A local copy of the file, directory or glob ``url`` names (``what`` names the config key, for errors),
    downloaded once into the cache and fetched again when an object changes. A glob returns the local
    directory with the same glob below it, as a string path's last part."""
    fs, path = filesystem(url)
    glob = any(ch in path for ch in "*?[")
    base = path[:min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] if glob else path
    try:
        files = fs.glob(path) if glob else (fs.find(path) if fs.isdir(path) else [path] if fs.exists(path) else [])
    except (OSError, PermissionError) as e:
        raise ConfigError(f"{what}: cannot read {url}: {e}") from None
    files = [f for f in files if not fs.isdir(f)]
    if not files:
        raise ConfigError(f"{what}: {url} names no file (nothing there, or no access)")
    key = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + _versions(fs, files)
    local = cache_root() / "remote" / key
    if not (local / MARKER).exists():
        staged = local.with_name(local.name + f".partial-{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        for f in files:
            rel = os.path.relpath(f, base) if f != base else os.path.basename(f)
            target = staged / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get(f, str(target))
        (staged / MARKER).write_text(url + "\n")
        try:
            os.replace(staged, local)  # another process may have finished first: theirs is as good
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
    if glob:
        return Path(str(local / path[len(base) + 1:]))
    return local if fs.isdir(path) else local / os.path.basename(path)


# ------------------------------------------------------------------------------------------ output_dir
def local_mirror(url: str) -> Path:
    """The local directory a remote output_dir trains in (the same on every rank and every rerun)."""
    return cache_root() / "outputs" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def remote_of(local: Path) -> str | None:
    """The output_dir URL a local mirror uploads to, or None for a plain local output_dir."""
    f = Path(local) / MIRROR
    return json.loads(f.read_text())["url"] if f.exists() else None


def newest_complete_checkpoint(url: str) -> str | None:
    """The name (``checkpoint-N``) of the bucket's newest checkpoint whose marker exists, or None."""
    fs, root = filesystem(url)
    found = _complete_remote_checkpoints(fs, root)
    return found[-1][1] if found else None


def set_aside_remote_checkpoints(url: str) -> None:
    """``resume: never``: move the bucket's checkpoints to ``previous-run-TIMESTAMP/``, so that a later
    ``resume: auto`` cannot pick one up (one process does this, before any checkpoint is written)."""
    import time

    fs, root = filesystem(url)
    aside = f"{root}/previous-run-{time.strftime('%Y%m%d-%H%M%S')}"
    for _, name in _complete_remote_checkpoints(fs, root):
        for f in fs.find(f"{root}/{name}"):  # file by file (s3fs's recursive mv trips over prefixes): copy, delete
            fs.copy(f, f"{aside}/{name}/{f[len(root) + len(name) + 2:]}")
        _remove_remote(fs, f"{root}/{name}")


def open_mirror(url: str, checkpoint: str | None = None, fetch_metrics: bool = False) -> Path:
    """Set up this node's mirror of an output_dir URL (one process per node: its local rank 0), and return it.

    The bucket holds the truth: checkpoints in the mirror other than ``checkpoint`` are removed (an earlier
    run's, or this node's part of one whose upload never completed), and ``checkpoint`` (the name global
    rank 0 chose, ``newest_complete_checkpoint``) comes down whole, every node's part of it, as each rank
    may read any part (a DCP checkpoint stores a replicated tensor once, in one rank's file). With
    ``fetch_metrics`` (global rank 0) metrics.jsonl comes down too."""
    local = local_mirror(url)
    local.mkdir(parents=True, exist_ok=True)
    (local / MIRROR).write_text(json.dumps({"url": url.rstrip("/")}))
    for p in local.iterdir():
        if re.fullmatch(r"checkpoint-\d+", p.name) and p.name != checkpoint:
            shutil.rmtree(p, ignore_errors=True)
    if checkpoint is None:
        return local
    fs, root = filesystem(url)
    staged = local / STAGING / checkpoint
    shutil.rmtree(staged, ignore_errors=True)
    prefix = f"{root}/{checkpoint}/"
    files = [f for f in fs.find(prefix) if not f.endswith("/" + MARKER)]
    targets = [str(staged / f[len(prefix):]) for f in files]
    for parent in sorted({os.path.dirname(t) for t in targets}):
        os.makedirs(parent, exist_ok=True)
    fs.get(files, targets)
    shutil.rmtree(local / checkpoint, ignore_errors=True)  # this node's own, possibly partial, copy
    os.replace(staged, local / checkpoint)
    if fetch_metrics and fs.exists(f"{root}/metrics.jsonl"):
        fs.get(f"{root}/metrics.jsonl", str(local / "metrics.jsonl"))
    return local


def _complete_remote_checkpoints(fs, root: str) -> list[tuple[int, str]]:
    """(step, name) of the bucket's checkpoints whose marker exists, in step order."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"checkpoint-(\d+)", n))]
    return sorted((s, n) for s, n in found if fs.exists(f"{root}/{n}/{MARKER}"))


def is_complete(url: str) -> bool:
    """Whether the uploaded checkpoint or output directory ``url`` has its marker (every part is there)."""
    fs, path = filesystem(url)
    return fs.exists(f"{path.rstrip('/')}/{MARKER}")


def _remove_remote(fs, path: str) -> None:
    """Remove a checkpoint or output folder from the bucket, its marker first: a half-deleted one is never
    complete."""
    if fs.exists(f"{path}/{MARKER}"):
        fs.rm(f"{path}/{MARKER}")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def clear_remote_checkpoint(local_root: Path, name: str) -> None:
    """Before checkpoint ``name`` is written (global rank 0): drop what the bucket holds under that name (an
    earlier upload cut off before its marker), so that no stale part is taken for one of this checkpoint's."""
    url = remote_of(local_root)
    if url is not None:
        fs, root = filesystem(url)
        _remove_remote(fs, f"{root}/{name}")


def upload_checkpoint_part(ckpt: Path) -> None:
    """Upload the files of checkpoint ``ckpt`` that this node's ranks wrote (each node's local rank 0, once
    every rank has written its part). The checkpoint is not complete until ``complete_checkpoint``."""
    url = remote_of(ckpt.parent)
    if url is None:
        return
    fs, root = filesystem(url)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)
    targets = [f"{root}/{ckpt.name}/{p.relative_to(ckpt).as_posix()}" for p in files]
    for parent in sorted({t.rsplit("/", 1)[0] for t in targets}):
        fs.makedirs(parent, exist_ok=True)  # object stores have no folders; a file:// URL needs them
    if files:
        fs.put([str(p) for p in files], targets)


def complete_checkpoint(ckpt: Path) -> None:
    """After every node uploaded its part of ``ckpt`` (global rank 0): metrics.jsonl and config.yaml beside
    it, then its marker, last; then checkpoints rotated away locally (save_total_limit) go from the bucket."""
    url = remote_of(ckpt.parent)
    if url is None:
        return
    fs, root = filesystem(url)
    for name in ("metrics.jsonl", "config.yaml"):
        if (ckpt.parent / name).exists():
            fs.put(str(ckpt.parent / name), f"{root}/{name}")
    fs.pipe(f"{root}/{ckpt.name}/{MARKER}", b"complete\n")
    for _, name in _complete_remote_checkpoints(fs, root):
        if not (ckpt.parent / name).exists():
            _remove_remote(fs, f"{root}/{name}")


def upload_outputs(local: Path) -> None:
    """At the end of a run: every top-level file and folder of the mirror but checkpoints (uploaded as they
    were written) and staging, then the marker at the top."""
    url = remote_of(local)
    if url is None:
        return
    fs, root = filesystem(url)
    if fs.exists(f"{root}/{MARKER}"):
        fs.rm(f"{root}/{MARKER}")  # an earlier run's final model is being replaced
    for p in sorted(local.iterdir()):
        if p.name in (MIRROR, MARKER) or p.name.startswith(".") or re.fullmatch(r"checkpoint-\d+", p.name):
            continue
        if p.is_dir():
            fs.put(str(p) + "/", f"{root}/{p.name}/", recursive=True)
        else:
            fs.put(str(p), f"{root}/{p.name}")
    fs.pipe(f"{root}/{MARKER}", b"complete\n")


def upload_file(local: Path, url: str) -> None:
    fs, path = filesystem(url)
    fs.put(str(local), path)


# ------------------------------------------------------------------------------------------ commands' files
def local_input(path: str, what: str) -> str:
    """``path`` itself, or for a URL its local copy (``fetch``)."""
    return str(fetch(path, what)) if is_remote(path) else path


@contextlib.contextmanager
def local_output(path: str, what: str, directory: bool = False, overwrite: bool = True):
    """Where a command writes ``path``: ``path`` itself, or for a URL a local temporary place uploaded once
    the command succeeded (a directory gets the marker last). ``overwrite=False`` refuses an existing URL."""
    if not is_remote(path):
        yield path
        return
    fs, remote = filesystem(path)
    if not overwrite and fs.exists(remote):
        raise ConfigError(f"{what}: {path} exists; --overwrite replaces it")
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-upload-"))
    local = tmp / (remote.rstrip("/").rsplit("/", 1)[-1] or "output")
    try:
        yield str(local)
        if directory:
            if fs.exists(remote):
                fs.rm(remote, recursive=True)
            fs.put(str(local) + "/", remote.rstrip("/") + "/", recursive=True)
            fs.pipe(f"{remote.rstrip('/')}/{MARKER}", b"complete\n")
        else:
            fs.put(str(local), remote)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
