"""Which model `aigid detect`, `aigid app` and `aigid score-table` score with: a model directory, the pipeline's
default, or a version of a model in the MLflow registry (``models:/<name>@<alias>``, ``models:/<name>/<version>``).

A registered version is read in place from a store whose files are on this machine. From a tracking server or a
bucket it is downloaded once into :func:`model_cache` and checked before it is trusted: a download's torch
detector must hash to the version's ``weights_hash`` tag (:func:`aigid.serving.registry.weights_hash`), and a
manifest (:data:`MANIFEST`), written last, records the size, SHA-256 and file status (modification and change
times, inode) of every file. Each use compares the files with the manifest: a stat per file, and the SHA-256 again
of a file whose status changed (a changed file always gets a new change time). A copy with a file missing, added
or altered, or without a manifest (a folder emptied, a copy from before manifests), is downloaded once more; one
that cannot be replaced, or whose new download does not match either, stops with one line naming its folder.

Nothing here imports mlflow until a registered model is asked for: a model directory loads as quickly as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from aigid.core.data import DataError
from aigid.serving.portable import GRAPH, is_portable
from aigid.serving.scorer import quickest

log = logging.getLogger(__name__)
# The pipeline's two scoring models: the exported one (export stage) and the retrained one it was exported from.
PORTABLE, RETRAINED = Path("models/portable"), Path("models/retrained")
# A cached version's record of its files, in its folder; written last, so a copy without it is not whole.
MANIFEST = ".aigid-manifest.json"


def default_model(precision: str) -> tuple[Path, str]:
    """The model `aigid detect` scores with when ``--model`` is not given, and why: of the pipeline's retrained
    model and its export, the quicker here (:func:`quickest`)."""
    return quickest(RETRAINED, PORTABLE, precision, f"{PORTABLE} is not there (the export stage writes it)")


def choose_model(spec: str | None, precision: str = "auto") -> tuple[Path, str | None]:
    """The model directory to score with for ``--model spec`` (None: the default), and why when the choice was
    made here: without ``--model`` and for a registered model, which carries its exported form too."""
    if spec is None:
        model_dir, why = default_model(precision)
        return resolve_model(str(model_dir)), why
    if spec.startswith("models:/"):
        torch_dir, portable_dir = download_registered(spec)
        return quickest(torch_dir, portable_dir, precision, "the registered version has no exported form")
    return resolve_model(spec), None


def resolve_model(spec: str) -> Path:
    """A model directory (checked to hold a detector), or ``models:/<name>@<alias>`` /
    ``models:/<name>/<version>`` from the MLflow registry, downloaded (its torch detector)."""
    if spec.startswith("models:/"):
        return download_registered(spec)[0]
    path = Path(spec)
    if not path.is_dir():
        raise DataError(f"{spec}: no such model directory")
    if not (path / "model.safetensors").is_file() and not is_portable(path):
        raise DataError(
            f"{spec}: no model.safetensors or model.onnx; not a model directory written by "
            f"`aigid train`, `aigid retrain` or `aigid export` (e.g. models/retrained)"
        )
    return path


def download_registered(spec: str) -> tuple[Path, Path | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` from the MLflow registry: read in place from a
    store on this machine, downloaded once per version into :func:`model_cache` from any other, and checked
    there on every use (an alias is resolved to its version each time, so a moved alias is followed): its torch
    detector directory and its exported form (None for a version registered without one)."""
    uri = registry_store()
    try:
        local = _cached_version(spec, uri)
    except DataError:
        raise
    except Exception as err:  # the registry raises several types; all mean "cannot get this model"
        raise DataError(
            f"{spec}: cannot download the model from {uri} ({type(err).__name__}: {err}); "
            f"`aigid register` registers models/retrained in this store"
        ) from None
    found = [p.parent for p in local.rglob("model.safetensors")]
    if len(found) != 1:
        raise DataError(f"{spec}: expected one detector directory in the model's artifacts, found {len(found)}")
    exported = [p.parent for p in local.rglob(GRAPH)]
    return found[0], exported[0] if len(exported) == 1 else None


def model_cache() -> Path:
    """Where registered versions are kept once downloaded: ``$AIGID_CACHE/models``, by default
    ``~/.cache/aigid/models`` (``$XDG_CACHE_HOME/aigid/models`` where that is set). A version's files never change
    in the registry, so a copy stays valid while it matches its manifest; deleting the folder only costs a
    download."""
    root = os.environ.get("AIGID_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigid"
    return Path(root) / "models"


def registry_store() -> str:
    """Point MLflow at the store registered models are read from (MLFLOW_TRACKING_URI, else the project's
    mlflow.db), checked to answer; return its URI."""
    import mlflow

    from aigid.tracking.runs import bound_http_retries, check_reachable, tracking_uri

    bound_http_retries()
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _cached_version(spec: str, uri: str) -> Path:
    """The artifacts of the registered version ``spec`` names: in place where the store keeps them on this
    machine, else from :func:`model_cache`, downloaded unless a checked copy is there. A version is known by the
    store, its name and number, and the run and time it was created: a store made anew at the same address, whose
    version 1 is another model, gets its own copy."""
    from urllib.parse import urlparse

    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from aigid.serving.registry import WEIGHTS_TAG

    client = mlflow.MlflowClient()
    found = get_model_name_and_version(client, spec)
    if len(found) == 1:  # models:/<logged model id> (MLflow 3): fixed once logged, as a version is; no tags
        source, label, key, weights = spec, found[0], repr((uri, spec)), None
    else:
        name, version = found
        mv = client.get_model_version(name, version)
        source, label = f"models:/{name}/{version}", f"{name}-v{version}"
        if urlparse(client.get_model_version_download_uri(name, version)).scheme in ("", "file"):
            # A store whose files are on this machine (the project's mlflow.db): MLflow gives their own folder.
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
        key = repr((uri, name, str(version), mv.run_id, mv.creation_timestamp, mv.source))
        weights = mv.tags.get(WEIGHTS_TAG)
    # Any name MLflow accepts, as a folder name: other characters as "_", and short (the key tells copies apart).
    folder = f"{re.sub(r'[^A-Za-z0-9._-]', '_', label)[:100]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    local = model_cache() / folder
    if local.exists():
        problem = check_copy(local)
        if problem is None:
            return local
        log.warning("%s: the cached copy of %s %s; downloading it again", local, source, problem)
        _set_aside(local, spec, problem)
    _download(spec, source, local, weights)
    return local


def _set_aside(local: Path, spec: str, problem: str) -> None:
    """Take the damaged copy ``local`` out of the cache (renamed first, so that no process finds half of it)."""
    import shutil
    import tempfile

    aside = Path(tempfile.mkdtemp(prefix=".damaged-", dir=local.parent))
    try:
        local.rename(aside / "copy")
    except FileNotFoundError:  # another process took it out first
        pass
    except OSError as err:
        raise DataError(
            f"{local}: the cached copy of {spec} {problem}, and it cannot be removed ({err.strerror}); delete "
            f"the folder"
        ) from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _download(spec: str, source: str, local: Path, weights: str | None) -> None:
    """Download ``source`` into ``local`` whole or not at all, checked against the ``weights_hash`` tag
    ``weights`` (None: a version without one), with its manifest."""
    import shutil
    import tempfile

    import mlflow

    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=local.parent))
    except OSError as err:
        raise DataError(
            f"{spec}: cannot keep the downloaded model in {local.parent} ({err.strerror}); set AIGID_CACHE "
            f"to a folder this user can write"
        ) from None
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(scratch))
        if weights is not None and _weights_of(scratch) != weights:
            raise DataError(
                f"{local}: {source} as downloaded is not what was registered (its torch detector does not "
                f"hash to the version's weights_hash tag); nothing was kept"
            )
        write_manifest(scratch)
        scratch.rename(local)  # whole or not at all: a download cut short never looks finished
    except OSError:
        if not local.is_dir():  # another process finished the same download first: use its copy
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _weights_of(artifacts: Path) -> str | None:
    """The ``weights_hash`` of the one torch detector among downloaded ``artifacts`` (None: not one)."""
    from aigid.serving.registry import weights_hash

    found = [p.parent for p in artifacts.rglob("model.safetensors")]
    return weights_hash(found[0]) if len(found) == 1 else None


def _files(folder: Path) -> list[str]:
    """The files of ``folder`` (relative, in order), its manifest and the manifest's temporary left out."""
    return sorted(
        rel for p in folder.rglob("*") if p.is_file() and MANIFEST not in (rel := p.relative_to(folder).as_posix())
    )


def _status(path: Path) -> list[int]:
    """What changes whenever a file's content does: size, modification and change times, inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Record each file of ``folder``: its SHA-256 and status (:func:`_status`)."""
    from aigid.core.files import write_json

    files = {rel: {"sha256": _sha256(folder / rel), "status": _status(folder / rel)} for rel in _files(folder)}
    write_json(folder / MANIFEST, {"files": files})


def check_copy(folder: Path) -> str | None:
    """What is wrong with the downloaded copy in ``folder`` (a phrase), or None when it holds exactly the files
    its manifest records. A file whose status is the recorded one is taken as it is; any other is hashed again,
    and where it is unchanged (a copy kept by a backup, say) its new status is recorded."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
        digests = {rel: (entry["sha256"], entry["status"]) for rel, entry in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "has no readable manifest of its files (a download cut short, or files removed)"
    found = _files(folder)
    if missing := sorted(set(digests) - set(found)):
        return f"lacks {missing[0]}" + (f" and {len(missing) - 1} other file(s)" if len(missing) > 1 else "")
    if added := sorted(set(found) - set(digests)):
        return f"holds {added[0]}, which was not downloaded"
    restated = False
    for rel in found:
        digest, status = digests[rel]
        now = _status(folder / rel)
        if now == status:
            continue
        if now[0] != status[0] or _sha256(folder / rel) != digest:
            return f"has {rel} altered since it was downloaded"
        recorded[rel]["status"], restated = now, True
    if restated:
        _restate(folder, recorded)
    return None


def _restate(folder: Path, files: dict) -> None:
    """Record the new status of files found unchanged; a cache this user cannot write is checked in full again
    next time, which costs time, not correctness."""
    from aigid.core.files import write_json

    try:
        write_json(folder / MANIFEST, {"files": files})
    except OSError as err:
        log.debug("%s: cannot update its manifest (%s)", folder, err)
