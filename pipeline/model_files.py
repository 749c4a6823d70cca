"""Model weights at a URI (``--model s3://bucket/models/clip-vit-base-patch32/``): copied once
per machine into a local cache, whose path the factory then receives. And the version of the
weights a run loaded, which its actors must load too.

On a cluster the factory runs in the driver and in every inference actor, on nodes that
share no disk; an object store is what they share. A URI naming one object is copied as that
file; a URI naming a prefix is copied as a folder (a Hugging Face snapshot, a checkpoint
directory), everything under it. The copy lives in ``~/.cache/batch-infer/models/KEY/``,
where KEY digests the URI and each object's size and modification time, so a changed object
is fetched again and an unchanged one never is. Processes on one machine (a node's actors)
take a lock (one per cache), so one of them downloads while the others wait and reuse its
copy; a download goes to a temporary folder renamed into place when complete, so a killed
download leaves no half-copied weights (the next download removes its folder). A new version's
copy replaces the copies of the URI's earlier versions, which no run can use again; copies of
other URIs stay until deleted.

The driver loads the weights first and fingerprints them; an actor that starts later (a node
added mid-run, a restart) must find the same version, or the run stops (:func:`resolve`'s
``expect``): rows of weights replaced mid-run would otherwise carry the first fingerprint. A
URI's version is its KEY; a local path's is its files' names, sizes and modification times,
compared on the driver's machine, and, where the run has other machines, a digest of their
bytes, compared on those, which may each hold a copy of their own (times differ between
copies, and a stale copy of a fine-tuned checkpoint has the same names and sizes). The
driver takes a local version after its factory ran, so a factory that writes a converted copy
beside its weights the first time does not count as a change.

Credentials and endpoint come from the environment, as for inputs and outputs
(:func:`pipeline.read.filesystem`); the pipeline hands its actors the driver's settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from pipeline import machine
from pipeline.read import filesystem, is_uri
from pipeline.spec import ModelError

CACHE = Path.home() / ".cache" / "batch-infer" / "models"
log = logging.getLogger(__name__)
SOURCE = ".batch-infer-source"  # in a copy's folder, beside the copy: the URI it copies


def local_path(model: str, cache: Path | None = None, expect: str | None = None) -> str:
    """``model``'s local copy: the cached file or folder a URI names, fetched if needed."""
    return fetch(model, cache, expect)[0]


def fetch(model: str, cache: Path | None = None, expect: str | None = None) -> tuple[str, str]:
    """(local copy, KEY) of the URI ``model``, fetched if needed. ``expect``: the KEY the
    run's driver loaded; another one (an object replaced or added since) is a ModelError,
    raised before anything is downloaded."""
    fs, root = filesystem(model)
    root = root.rstrip("/")  # "s3://bucket/models/clip/" names the same prefix
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            objects = [info]
        elif info.type == pafs.FileType.Directory:
            objects = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if i.type == pafs.FileType.File]
        else:
            objects = []
    except OSError as e:
        raise ModelError(f"Cannot read the model weights at '{model}': {e}") from e
    if not objects:
        raise ModelError(f"No model weights at '{model}' (no such object or prefix).")
    single = info.type == pafs.FileType.File
    name = root.rsplit("/", 1)[-1] or "model"
    identity = [model.rstrip("/")] + sorted(
        f"{_relative(i.path, root, single)} {i.size} {i.mtime_ns}" for i in objects)
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    if expect is not None and key != expect:
        raise _changed(model)
    base = cache or CACHE
    target = base / key
    if not (target / name).exists():
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(base / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download at a time per machine
            if not (target / name).exists():
                for left in base.glob("*.partial-*"):  # a killed download's (we hold the lock)
                    shutil.rmtree(left, ignore_errors=True)
                _download(fs, root, objects, single, base, target, name, model)
                _evict_older(base, key, identity[0])
    return str(target / name), key


def _evict_older(base: Path, key: str, uri: str) -> None:
    """Remove the copies of ``uri``'s earlier versions (called under the cache's lock, once
    ``key``'s copy is complete). No run can use one again: a run's actors load the version its
    driver loaded, and one that finds the URI changed stops the run before fetching anything
    (:func:`fetch`'s ``expect``). A model retrained nightly would otherwise add a copy a day
    to each node's disk. Processes that loaded an old copy keep it in memory."""
    for other in base.iterdir():
        if other.name == key or not other.is_dir():
            continue
        try:
            source = (other / SOURCE).read_text()
        except OSError:  # another kind of folder, or a copy made before sources were kept
            continue
        if source == uri:
            shutil.rmtree(other, ignore_errors=True)


def resolve(model: str | None, expect: str | None = None) -> tuple[str | None, str]:
    """(``model`` as a factory receives it, its version): a URI's local copy and KEY (see
    :func:`fetch`); a local path unchanged, with its :func:`local_version` when there is one
    to compare with. ``expect``: the version the run's driver loaded; another one is a
    ModelError (for a local path, only on the driver's machine: another machine may hold a
    copy of its own, with other times, whose bytes :func:`check_copy` compares once the
    factory ran). The driver takes a local path's version itself, after its factory ran (see
    the module's docstring)."""
    if not model:
        return model, ""
    if is_uri(model):
        return fetch(model, expect=expect)
    if not expect:
        return model, ""
    version = local_version(model)
    if not version:
        return model, version
    machine_here, files_here, _ = _parts(version)
    machine_there, files_there, _ = _parts(expect)
    if machine_here == machine_there and files_here != files_there:
        raise _changed(model)
    return model, version


def with_content(model: str | None, version: str) -> str:
    """The driver's ``version`` of a local ``model``, with the :func:`content_digest` its
    actors on other machines compare (:func:`check_copy`); unchanged for a URI (whose
    version is already its objects')."""
    if not model or is_uri(model) or not version:
        return version
    content = content_digest(model, version)
    return f"{version} {content}" if content else version


def check_copy(model: str | None, expect: str) -> None:
    """On a machine other than the driver's, refuse a local ``model`` whose bytes are not
    those the driver loaded (``expect``: the driver's version :func:`with_content`). Called
    after the factory ran, as the driver took its digest, so a factory that writes a
    converted copy beside its weights the first time on each machine compares alike."""
    if not model or is_uri(model):
        return
    version = local_version(model)
    machine_there, _, content = _parts(expect)
    if not version or not content or _parts(version)[0] == machine_there:
        return
    here = content_digest(model, version)
    if here and here != content:
        raise _differs(model)


def local_version(path: str) -> str:
    """'MACHINE DIGEST': this machine, and a digest of the names, sizes and modification times
    of the files at ``path``; '' for nothing there, or for more than :data:`MAX_FILES` files
    (not a checkpoint: not worth the walk)."""
    found = [(name, st.st_size, st.st_mtime_ns) for name, _, st in _files(path)]
    if not found:
        return ""
    return f"{machine.identity('mnt')} {hashlib.sha256(json.dumps(found).encode()).hexdigest()[:24]}"


def _files(path: str) -> list[tuple[str, str, os.stat_result]]:
    """(name under ``path``, full path, stat) of each file at ``path`` in a stable order ('' as
    the name of ``path`` itself when it is a file); none for more than :data:`MAX_FILES`."""
    if os.path.isfile(path):
        return [("", path, os.stat(path))]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            found.append((os.path.relpath(full, path), full, st))
            if len(found) > MAX_FILES:
                return []
    return found


def _parts(version: str) -> tuple[str, str, str]:
    """(machine, digest of the files' times, digest of their bytes) of a local version, as
    :func:`local_version` and :func:`with_content` write it; '' for a part it lacks."""
    machine_id, files, content = (version.split(" ") + ["", ""])[:3]
    return machine_id, files, content


MAX_FILES = 10_000
DIGESTS = CACHE.parent / "digests"
# Past this, no digest: reading a folder that holds every epoch's checkpoint (the factory
# picks one) would cost the driver minutes per new version; 16 GB is 23 s at the 0.7 GB/s
# measured here, and more than the weights of the image models this pipeline serves.
DIGEST_MAX_BYTES = 16 << 30


def content_digest(path: str, version: str) -> str:
    """A digest of the bytes of the files at ``path`` (names, sizes and contents): what tells
    two machines' copies apart, where times cannot. ``version`` is the path's
    :func:`local_version` on this machine, under which the digest is kept (in
    :data:`DIGESTS`), so a machine reads each version of a checkpoint once (1.4 s a GB on the
    2-core development machine, from the page cache); '' where ``version`` is ''."""
    if not version:
        return ""
    kept = DIGESTS / hashlib.sha256(f"{os.path.abspath(path)} {version}".encode()).hexdigest()
    try:
        return kept.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    try:
        files = _files(path)  # local_version's walk: its order, its sizes
        if sum(st.st_size for _, _, st in files) > DIGEST_MAX_BYTES:
            log.info("Not comparing the bytes of '%s' between machines: over %d GB there (a "
                     "folder of many checkpoints?)", path, DIGEST_MAX_BYTES >> 30)
            return ""
        for name, full, st in files:
            digest.update(f"{name} {st.st_size}\n".encode())
            with open(full, "rb") as f:
                while chunk := f.read(8 * 2**20):
                    digest.update(chunk)
    except OSError:  # a file that went away: the factory, not this, says what is wrong
        return ""
    found = digest.hexdigest()[:24]
    try:
        DIGESTS.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = kept.with_name(f"{kept.name}.{os.getpid()}")
        partial.write_text(found)
        os.replace(partial, kept)
    except OSError:  # a read-only home: hash again next time
        pass
    return found


def _changed(model: str) -> ModelError:
    return ModelError(
        f"The model weights at '{model}' changed after this run started (a file there was "
        "replaced, added or removed): its rows would mix two models under one fingerprint. "
        "Rows written so far are the first weights'; to use the new ones, run again with "
        "--overwrite.")


def _differs(model: str) -> ModelError:
    return ModelError(
        f"The model weights at '{model}' on this machine are not the bytes the run's driver "
        "loaded from that path on its own machine (a copy of another version?): their rows "
        "would carry the driver's fingerprint. Give every node the same weights: shared "
        "storage, the same copy on each, or --model s3://... (copied once per machine).")


def _download(fs, root: str, objects, single: bool, base: Path, target: Path, name: str,
              model: str) -> None:
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=base))
    try:
        for info in objects:
            local = partial / name
            if not single:
                local = local / _relative(info.path, root, single)
            local.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
        (partial / SOURCE).write_text(model.rstrip("/"))  # which URI: see _evict_older
        if target.exists():  # a copy someone emptied by hand
            shutil.rmtree(target)
        os.replace(partial, target)  # complete, or not there at all
    except OSError as e:
        raise ModelError(f"Cannot copy the model weights at '{model}' to '{base}': {e}") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _relative(path: str, root: str, single: bool) -> str:
    return "" if single else path[len(root) + 1:]
