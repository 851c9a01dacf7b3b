"""Paths that are URLs (``s3://bucket/key``, ``gs://...``, any fsspec protocol): data sources, the base model,
``train.output_dir``, and the inputs and outputs of generate and eval.

fsspec (``s3fs``, ``gcsfs``: extra ``lmforge[cloud]``) does the transfers with the standard configuration
(for S3 the AWS environment variables including ``AWS_ENDPOINT_URL``, and profiles). What lmforge adds:

  * **Inputs are copied once into the lmforge cache**, keyed by the URL and the objects' ETags (or sizes and
    modification times), so a base model or a dataset is downloaded once and a changed object is fetched
    again. The rest of lmforge then reads local files.
  * **An output_dir URL trains in a local mirror** (``<cache>/outputs/<hash>``) and uploads each complete
    checkpoint and the final model. A marker (``.lmforge-complete``) is written last, after every other file
    of that checkpoint or model: a partial upload (a killed job, a lost connection) is never taken for
    complete. ``train.resume: auto`` finds the newest complete checkpoint in the bucket, downloads it into
    the mirror, and the run continues bitwise as from a local checkpoint.
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


def is_remote(path: str | os.PathLike | None) -> bool:
    return path is not None and bool(_URL.match(str(path))) and not str(path).startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; a clear error when its package is missing."""
    import fsspec

    kwargs = {}
    if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        # fsspec reuses a filesystem made with the same arguments: with the endpoint among them, a changed
        # AWS_ENDPOINT_URL gets a new client instead of one still talking to the old endpoint
        kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as e:
        raise ConfigError(f"{url}: reading this URL needs {e.name or 'an fsspec backend'} (pip install "
                          "'lmforge[cloud]', which has s3fs and gcsfs)") from None
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


def open_mirror(url: str, resume: str, is_main: bool) -> Path:
    """Set up the local mirror of an output_dir URL (rank 0 downloads; call ``barrier`` after): with
    ``resume: auto`` the newest complete checkpoint in the bucket (and metrics.jsonl) comes down unless the
    mirror has it already; with ``resume: never`` the bucket's earlier checkpoints are moved aside, so a
    later ``resume: auto`` cannot pick one up."""
    local = local_mirror(url)
    if not is_main:
        return local
    local.mkdir(parents=True, exist_ok=True)
    (local / MIRROR).write_text(json.dumps({"url": url.rstrip("/")}))
    fs, root = filesystem(url)
    remote = _complete_remote_checkpoints(fs, root)
    if resume == "auto" and remote:
        step, name = remote[-1]
        if not (local / name / "trainer_state.json").exists():
            staged = local / STAGING / name
            shutil.rmtree(staged, ignore_errors=True)
            staged.parent.mkdir(parents=True, exist_ok=True)
            fs.get(f"{root}/{name}/", str(staged) + "/", recursive=True)
            (staged / MARKER).unlink(missing_ok=True)
            shutil.rmtree(local / name, ignore_errors=True)  # an incomplete local copy
            os.replace(staged, local / name)
            if fs.exists(f"{root}/metrics.jsonl"):
                fs.get(f"{root}/metrics.jsonl", str(local / "metrics.jsonl"))
    elif resume == "never" and remote:
        import time

        aside = f"{root}/previous-run-{time.strftime('%Y%m%d-%H%M%S')}"
        for _, name in remote:  # file by file (s3fs's recursive mv trips over prefixes): copy, then delete
            for f in fs.find(f"{root}/{name}"):
                fs.copy(f, f"{aside}/{name}/{f[len(root) + len(name) + 2:]}")
            fs.rm(f"{root}/{name}/{MARKER}")  # first: a half-deleted checkpoint is never complete
            fs.rm(f"{root}/{name}", recursive=True)
    return local


def _complete_remote_checkpoints(fs, root: str) -> list[tuple[int, str]]:
    """(step, name) of the bucket's checkpoints whose marker exists, in step order."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"checkpoint-(\d+)", n))]
    return sorted((s, n) for s, n in found if fs.exists(f"{root}/{n}/{MARKER}"))


def upload_checkpoint(ckpt: Path) -> None:
    """After a checkpoint is complete in a mirror: upload it, then its marker; metrics.jsonl beside it."""
    url = remote_of(ckpt.parent)
    if url is None:
        return
    fs, root = filesystem(url)
    if fs.exists(f"{root}/{ckpt.name}"):
        fs.rm(f"{root}/{ckpt.name}", recursive=True)  # an earlier, partial upload
    fs.put(str(ckpt) + "/", f"{root}/{ckpt.name}/", recursive=True)
    for name in ("metrics.jsonl", "config.yaml"):
        if (ckpt.parent / name).exists():
            fs.put(str(ckpt.parent / name), f"{root}/{name}")
    fs.pipe(f"{root}/{ckpt.name}/{MARKER}", b"complete\n")


def prune_remote(local_root: Path) -> None:
    """Checkpoints rotated away locally (save_total_limit) go from the bucket too, each marker first."""
    url = remote_of(local_root)
    if url is None:
        return
    fs, root = filesystem(url)
    for _, name in _complete_remote_checkpoints(fs, root):
        if not (Path(local_root) / name).exists():
            fs.rm(f"{root}/{name}/{MARKER}")
            fs.rm(f"{root}/{name}", recursive=True)


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
