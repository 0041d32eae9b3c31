"""Model uploads: staged, validated, durable, then published atomically.

An upload's files are written into a private folder under ``<repository>/.staging`` (the same filesystem,
and a name the repository never lists), checked, fsynced, and only then moved into the model folder with
renames. The ``COMMITTED`` marker, written and fsynced before the first rename, is the commit point: at
start :func:`recover_staging` deletes unfinished uploads and rolls committed ones forward, so a crash,
kill -9, full disk or client disconnect leaves either the repository as it was or the whole upload.

Layout of one upload::

    .staging/<id>/incoming/<folder>/<file>   as received; folder = the version in the file key, 0 = "next"
    .staging/<id>/incoming/config.json       the config sent with the files, if any
    .staging/<id>/shared/<file>              model-level files: labels (``label_filename``) and
    .staging/<id>/shared/warmup/<file>       warmup data (``input_data_file``), published beside the config
    .staging/<id>/model/<version>/<file>     renumbered at publish, under the repository's publish lock
    .staging/<id>/COMMITTED                  {"model": name, "versions": [...], "config": true|false}
    .staging/PUBLISH.lock                    flock-ed while one server numbers and renames (any server's)
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from optimizers.errors import OptimizeError
from optimizers.reference import load_npz
from server.convert.staging import ACCEPTED, adopt_sources, check_sources
from server.errors import InternalError, InvalidInput, LoadFailed, PayloadTooLarge
from server.protocol.numbers import parse_positive
from server.repository.config import (
    CONFIG_FILES,
    DEFAULT_MODEL_FILENAME,
    LoadedConfig,
    ModelConfig,
    complete_config,
    model_filename,
    parse_config,
    read_config,
)
from server.repository.layout import Repository, check_model_name
from server.repository.modelfile import (
    check_external_data,
    check_file_name,
    check_graph,
    load_graph,
    refuse_pickle_name,
    sniff_format,
)

log = logging.getLogger("optiserve.upload")

STAGING = ".staging"
MARKER = "COMMITTED"
LOCK_FILE = "LOCK"
"""In each staging folder: flock-ed by the server using the folder, for as long as it does."""
PUBLISH_LOCK = "PUBLISH.lock"
"""In ``.staging`` itself: flock-ed while versions are numbered and renamed into place (or withdrawn), so two
servers on one repository never number two uploads alike. Recovery never deletes it: a lock file unlinked
while held would let the next server lock a new one beside it."""
NEXT_VERSION = 0
UPLOADED_CONFIG = "config.json"
MAX_VERSION = 2**63 - 1
FILE_KEY = re.compile(r"^([1-9][0-9]{0,18})/([^/]+|saved_model(?:/[^/]+){1,8})$")
SHARED = "shared"
WARMUP_FOLDER = "warmup"
SAMPLES_FILE = "samples.npz"
SHARED_KEY = re.compile(r"^(?:warmup/)?[^/]+$")
ENSEMBLE = "ensemble"
"""Triton's platform for a pipeline of other models (server/models/ensemble.py): its upload is its config alone."""

Receiver = Callable[["StagedUpload"], Awaitable[None]]


def parse_file_key(key: str) -> tuple[int | None, str]:
    """Triton's ``file:`` parameters without the prefix, paths relative to the model folder:
    ``<positive version>/<plain file name>`` or ``<version>/saved_model/<plain names>`` (folder = the
    version), or a model-level file (folder ``None``): ``<plain name>`` (a label file) or
    ``warmup/<plain name>`` (warmup data)."""
    match = FILE_KEY.fullmatch(key)
    if match is not None:
        if int(match.group(1)) > MAX_VERSION:
            raise InvalidInput(f"file key {key!r}: the version number is too large")
        return int(match.group(1)), check_file_path(match.group(2), f"file key {key!r}: file name")
    if SHARED_KEY.fullmatch(key) is None:
        raise InvalidInput(
            f"file key {key!r} must be <version>/<file name> (or <version>/saved_model/<path>) with a positive "
            "version number, or a model-level <file name> (a label file) or warmup/<file name>"
        )
    return None, check_shared_path(key, f"file key {key!r}")


def check_shared_path(path: str, what: str) -> str:
    """A model-level file: a plain name that is neither a version number nor a config file, or
    ``warmup/<plain name>``."""
    name = path.removeprefix(f"{WARMUP_FOLDER}/")
    check_file_name(name, f"{what}: file name")
    if name == path and (name in CONFIG_FILES or name == WARMUP_FOLDER or re.fullmatch(r"[0-9]+", name)):
        raise InvalidInput(
            f"{what}: {name!r} cannot be a model-level file (the config goes in the config parameter; "
            "a number names a version folder)"
        )
    return path


def check_file_path(name: str, what: str) -> str:
    """A plain file name, or ``saved_model/`` followed by plain names."""
    for part in name.split("/"):
        check_file_name(part, what)
    return name


def parse_version(text: str) -> int:
    """A version number given as text: a positive integer without leading zeros."""
    if not re.fullmatch(r"[1-9][0-9]{0,18}", text.strip()) or int(text) > MAX_VERSION:
        raise InvalidInput(f"version {text!r} must be a positive integer")
    return int(text)


def assign_versions(folders: list[int], existing: set[int], requested: int | None) -> dict[int, int]:
    """Staged folder -> published version. Folder 0 takes ``requested`` (which must be free) or the next
    free number; a numbered folder keeps its number when free and takes the next free one otherwise, so
    versions on disk are never overwritten."""
    taken = set(existing)
    mapping: dict[int, int] = {}
    for folder in sorted(folders):
        wanted = requested if folder == NEXT_VERSION else folder
        if folder == NEXT_VERSION and wanted is not None and wanted in taken:
            raise InvalidInput(f"version {wanted} already exists; versions are never overwritten")
        if wanted is None or wanted in taken:
            wanted = max(taken, default=0) + 1
        mapping[folder] = wanted
        taken.add(wanted)
    return mapping


class StagedFile:
    """One file being written into staging; :meth:`close` makes it durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 - closed by close()/abort()

    def write(self, data: bytes) -> None:
        """Append bytes (the caller has counted them against the cap)."""
        assert self._file is not None, "write after close"
        self._file.write(data)

    def close(self) -> None:
        """Flush and fsync, so the bytes are on disk before the upload can commit."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def abort(self) -> None:
        """Close without syncing (the upload is being thrown away)."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class UploadResult:
    """What an upload ended as: its versions, the state of the newest, and why it failed if it did."""

    name: str
    versions: list[int]
    state: str
    reason: str = ""
    failed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The curl upload reply: ``{"name", "version", "state", "reason"}``."""
        version = str(self.versions[-1]) if self.versions else ""
        return {"name": self.name, "version": version, "state": self.state, "reason": self.reason}


@dataclass
class StagedUpload:
    """One upload in progress. Files land in a private staging folder; :meth:`publish` (called under the
    model's lock) moves them into the repository; :meth:`withdraw` takes them back out if the load fails."""

    root: Path
    model_name: str
    max_bytes: int
    requested_version: int | None = None
    size: int = 0
    versions: list[int] = field(default_factory=list)
    published: asyncio.Event = field(default_factory=asyncio.Event)
    _created_model: bool = False
    _lock: int = -1
    _open: list[StagedFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir, self._lock = new_staging_dir(self.root)
        self.incoming = self.dir / "incoming"
        self.incoming.mkdir()
        self.shared = self.dir / SHARED

    # ---- receiving ------------------------------------------------------------------------------
    def count(self, size: int) -> None:
        """Count bytes against the cap before writing them (413 past it)."""
        self.size += size
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"the upload exceeds the limit of {self.max_bytes} bytes (--max-upload-bytes)")

    def open(self, folder: int, name: str) -> StagedFile:
        """A new file ``<folder>/<name>``; the same name twice is refused."""
        return self._new_file(self.incoming / str(folder) / check_file_path(name, "file name"), f"{folder}/{name}")

    def open_shared(self, path: str) -> StagedFile:
        """A new model-level file: ``<name>`` (labels) or ``warmup/<name>``; the same path twice is refused."""
        return self._new_file(self.shared / check_shared_path(path, "model-level file"), path)

    def _new_file(self, target: Path, shown: str) -> StagedFile:
        if target.exists():
            raise InvalidInput(f"file {shown} is given twice")
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = StagedFile(target)
        self._open.append(staged)
        return staged

    def open_extra_file(self, path: str) -> StagedFile:
        """The curl upload's ``file`` field: its filename is the model-level path (``labels.txt``,
        ``warmup/x.bin``)."""
        return self.open_shared(path)

    def open_samples_file(self) -> StagedFile:
        """The curl upload's ``samples`` field: the new version's ``samples.npz``."""
        return self.open(NEXT_VERSION, SAMPLES_FILE)

    def open_model_file(self, filename: str) -> StagedFile:
        """The curl upload's model file, staged as the next version's ``model.onnx`` whatever the client called
        it. Its name is only checked: a pickle-based format by its name is refused (415) before a byte lands."""
        refuse_pickle_name(filename, "uploaded file")
        return self.open(NEXT_VERSION, DEFAULT_MODEL_FILENAME)

    def request_version(self, text: str) -> None:
        """The version the upload asks for (a positive integer); without it, the next free one."""
        self.requested_version = parse_version(text)

    def add_file(self, key: str, data: bytes) -> None:
        """Write one whole file given by a Triton file key (blocking: call it in a thread)."""
        folder, name = parse_file_key(key)
        self.count(len(data))
        staged = self.open_shared(name) if folder is None else self.open(folder, name)
        staged.write(data)
        staged.close()

    def set_config(self, text: str) -> None:
        """Keep the config sent with the upload; it becomes the model's config.json when published.
        :meth:`validate` checks it (every value, every file name it gives) before anything is published."""
        staged = StagedFile(self.incoming / UPLOADED_CONFIG)
        self._open.append(staged)
        staged.write(text.encode("utf-8"))
        staged.close()

    # ---- validation (blocking: run in a thread) -------------------------------------------------
    def validate(self, default_max_batch_size: int) -> None:
        """Check the config (every value and file name it gives: parse_config) and every staged version
        against it, all before anything is published: a bad config is a 400 and never lands on disk."""
        loaded = self._config()
        folders = self.folders()
        if loaded.config.platform == ENSEMBLE:
            self._validate_ensemble(loaded.config, folders)
            self._validate_shared(loaded.config)
            return
        if not folders:
            raise InvalidInput("the upload carries no model file (only an ensemble's config comes without one)")
        filename = model_filename(loaded.config)
        for folder in folders:
            folder_dir = self.incoming / str(folder)
            placeholder = folder_dir / DEFAULT_MODEL_FILENAME
            adopt_sources(folder_dir, filename, self._label(folder_dir, filename))
            if folder == NEXT_VERSION and filename != DEFAULT_MODEL_FILENAME and placeholder.is_file():
                placeholder.rename(folder_dir / filename)
            self._validate_version(folder_dir, filename, loaded, default_max_batch_size)
        self._validate_shared(loaded.config)

    def _validate_ensemble(self, config: ModelConfig, folders: list[int]) -> None:
        """An ensemble's upload is its config: no model file, and an empty version folder made here (Triton's
        layout). Every step's model must already be in the repository (an upload carries one model: upload the
        members first). The wiring and the tensor types are checked when it loads; a failure withdraws it."""
        where = f"ensemble {self.model_name!r}"
        staged = sorted(p.relative_to(self.incoming).as_posix() for p in self.incoming.rglob("*") if p.is_file())
        files = [name for name in staged if name != UPLOADED_CONFIG]
        if files:
            raise InvalidInput(f"{where}: an ensemble has no model file, but the upload carries {files}")
        if not config.ensemble_scheduling.step:
            raise InvalidInput(f"{where}: ensemble_scheduling has no step")
        on_disk = set(Repository(self.root).model_names())
        for index, step in enumerate(config.ensemble_scheduling.step):
            label = f"{where}: step {index} (model {step.model_name!r})"
            if step.model_name == self.model_name:
                raise InvalidInput(f"{label} names the ensemble itself")
            if step.model_name not in on_disk:
                raise InvalidInput(f"{label}: the model is not in the repository; upload it before the ensemble")
        if not folders:
            (self.incoming / str(NEXT_VERSION)).mkdir()

    def _validate_shared(self, config: ModelConfig) -> None:
        """Every uploaded model-level file is one the config refers to, and every file the config refers
        to is uploaded or already in the model folder (400 naming the field otherwise)."""
        wanted: dict[str, str] = {}
        for index, output in enumerate(config.output):
            if output.label_filename:
                wanted.setdefault(output.label_filename, f"output[{index}].label_filename")
        for index, warmup in enumerate(config.model_warmup):
            for key, value in warmup.inputs.items():
                if value.input_data_file:
                    where = f"model_warmup[{index}].inputs[{key!r}].input_data_file"
                    wanted.setdefault(f"{WARMUP_FOLDER}/{value.input_data_file}", where)
        uploaded = (
            {p.relative_to(self.shared).as_posix() for p in self.shared.rglob("*") if p.is_file()}
            if self.shared.is_dir()
            else set()
        )
        unused = sorted(uploaded - set(wanted))
        if unused:
            raise InvalidInput(
                f"model-level files {unused} are not referred to by the config (output label_filename, "
                f"model_warmup input_data_file); validation samples go in a version folder as {SAMPLES_FILE}"
            )
        model_dir = self.root / self.model_name
        for path, where in wanted.items():
            if path not in uploaded and not (model_dir / path).is_file():
                raise InvalidInput(f"{where}: {path} is neither uploaded nor in the model folder")

    def _config(self) -> LoadedConfig:
        """The config sent with the upload, else the model's current one, else an empty one."""
        uploaded = self.incoming / UPLOADED_CONFIG
        if uploaded.is_file():
            return parse_config(uploaded.read_text(encoding="utf-8"), "json")
        if not (self.root / self.model_name).is_dir():
            return LoadedConfig(ModelConfig(), set())
        return read_config(Repository(self.root).model_dir(self.model_name))  # never through a link out

    def ensemble_config(self) -> str | None:
        """The uploaded config's text when it is an ensemble's (the manager loads its members from it before the
        upload is published); None otherwise."""
        uploaded = self.incoming / UPLOADED_CONFIG
        if not uploaded.is_file():
            return None
        text = uploaded.read_text(encoding="utf-8")
        return text if is_ensemble_config(text) else None

    @staticmethod
    def _label(folder_dir: Path, filename: str) -> str:
        return f"uploaded {folder_dir.name}/{filename}" if folder_dir.name != "0" else f"uploaded {filename}"

    def _validate_version(self, folder_dir: Path, filename: str, loaded: LoadedConfig, max_batch: int) -> None:
        label = self._label(folder_dir, filename)
        if check_sources(folder_dir, filename, label):
            return  # a framework model: converted (and its config completed) when it loads
        model_path = folder_dir / filename
        if not model_path.is_file():
            raise InvalidInput(
                f"{label}: the model file is missing (the config names {filename!r}; also accepted: {ACCEPTED})"
            )
        sniff_format(model_path, label)
        graph = load_graph(model_path, label)
        used = check_external_data(graph, folder_dir, label)
        if (folder_dir / SAMPLES_FILE).is_file():
            check_samples(folder_dir / SAMPLES_FILE, f"{label}: {SAMPLES_FILE}")
        unused = sorted({p.name for p in folder_dir.iterdir()} - used - {filename, SAMPLES_FILE})
        if unused:
            raise InvalidInput(f"{label}: files {unused} are neither the model nor external data it uses")
        check_graph(model_path, label)
        complete_config(loaded, self.model_name, graph, max_batch)

    def folders(self) -> list[int]:
        """The staged version folders (0 = the next free version)."""
        return sorted(int(p.name) for p in self.incoming.iterdir() if p.is_dir())

    # ---- publishing (called by ModelManager.load under the model's lock) -------------------------
    async def publish(self) -> None:
        """Move the upload into the repository; from here on it survives a crash."""
        await asyncio.to_thread(self.publish_now)
        self.published.set()

    async def withdraw(self) -> None:
        """Take a published upload back out (its load failed), so a restart serves what it served before."""
        try:
            await asyncio.to_thread(self.withdraw_now)
        except OSError as exc:
            log.error("could not withdraw versions %s of model %s: %s", self.versions, self.model_name, exc)

    def publish_now(self) -> list[int]:
        """Number the versions, fsync, write the commit marker, then rename into place, all under the
        repository's publish lock: the model's asyncio lock orders this server's loads only."""
        with publish_lock(self.root):
            return self._publish_locked()

    def _publish_locked(self) -> list[int]:
        model_dir = self.root / self.model_name
        self._check_target(model_dir)
        existing = _numeric_folders(model_dir)
        mapping = assign_versions(self.folders(), existing, self.requested_version)
        staged_model = self.dir / "model"
        staged_model.mkdir()
        for folder, version in mapping.items():
            version_dir = staged_model / str(version)
            os.rename(self.incoming / str(folder), version_dir)
            fsync_dir(version_dir)
        has_config = (self.incoming / UPLOADED_CONFIG).is_file()
        if has_config:
            os.rename(self.incoming / UPLOADED_CONFIG, staged_model / UPLOADED_CONFIG)
        if self.shared.is_dir():
            for child in sorted(self.shared.iterdir()):
                os.rename(child, staged_model / child.name)
                if child.name == WARMUP_FOLDER:
                    fsync_dir(staged_model / child.name)
        fsync_dir(staged_model)
        marker = {"model": self.model_name, "versions": sorted(mapping.values()), "config": has_config}
        write_durably(self.dir / MARKER, json.dumps(marker).encode())
        fsync_dir(self.dir)
        self._created_model = not model_dir.exists()
        apply_committed(self.dir, self.root)
        self.versions = sorted(mapping.values())
        log.info("model %s: published version(s) %s", self.model_name, self.versions)
        return self.versions

    def _check_target(self, model_dir: Path) -> None:
        """Renames only publish atomically inside one filesystem, and never through a link out of the root."""
        if not model_dir.exists():
            return
        if not model_dir.resolve().is_relative_to(self.root.resolve()):
            raise InvalidInput(f"model folder {self.model_name!r} resolves outside the model repository")
        if model_dir.stat().st_dev != self.dir.stat().st_dev:
            raise InternalError(
                f"model folder {self.model_name!r} is on another filesystem than {STAGING}; "
                "uploads are published by rename and need one filesystem"
            )

    def withdraw_now(self) -> None:
        """Rename the published versions (or the model folder this upload created) into staging, then
        delete them there: each rename is atomic, and leftovers are cleaned at the next start."""
        with publish_lock(self.root):
            self._withdraw_locked()
        log.warning("model %s: withdrew version(s) %s after a failed load", self.model_name, self.versions)

    def _withdraw_locked(self) -> None:
        trash, lock = new_staging_dir(self.root)
        model_dir = self.root / self.model_name
        if self._created_model:
            os.rename(model_dir, trash / "model")
        else:
            for version in self.versions:
                if (model_dir / str(version)).is_dir():
                    os.rename(model_dir / str(version), trash / str(version))
            fsync_dir(model_dir)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        os.close(lock)

    def discard(self) -> None:
        """Delete whatever is left in staging (nothing, once published). A committed upload whose renames
        failed halfway is kept: the next start rolls it forward."""
        for staged in self._open:
            staged.abort()
        try:
            if (self.dir / MARKER).is_file():
                log.error("model %s: publishing failed after its commit; the next start finishes it", self.model_name)
                return
            shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the staging folder's lock (as the end of this process would): from here on another
        server's start-up recovery may finish or delete whatever is left of it."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def is_ensemble_config(text: str) -> bool:
    """Whether a config given as JSON text is an ensemble's (False for one that does not parse: whoever reads it
    next reports why)."""
    try:
        return bool(parse_config(text, "json").config.platform == ENSEMBLE)
    except (InvalidInput, LoadFailed):
        return False


def files_receiver(files: dict[str, bytes], config_text: str | None) -> Receiver:
    """A receiver for Triton's load with ``file:<version>/<name>`` parameters already decoded."""

    async def receive(staged: StagedUpload) -> None:
        total = sum(len(data) for data in files.values())
        if total > staged.max_bytes:
            staged.count(total)  # refuse before writing anything
        if config_text is not None:
            await asyncio.to_thread(staged.set_config, config_text)
        for key, data in files.items():
            await asyncio.to_thread(staged.add_file, key, data)

    return receive


# ---- the commit protocol (also run at start to finish interrupted uploads) -----------------------
def apply_committed(txn: Path, root: Path) -> None:
    """Roll a committed upload forward; idempotent, so a crash halfway is finished at the next start."""
    marker = json.loads((txn / MARKER).read_text(encoding="utf-8"))
    name = check_model_name(str(marker["model"]))
    staged, target = txn / "model", root / name
    if staged.is_dir():
        if not target.exists():
            os.rename(staged, target)  # a new model appears whole
        else:
            _move_children(staged, target)
    if marker.get("config"):
        for other in CONFIG_FILES:
            if other != UPLOADED_CONFIG:
                (target / other).unlink(missing_ok=True)  # the uploaded config.json replaces them
    fsync_dir(target)
    fsync_dir(root)
    shutil.rmtree(txn)


def _move_children(staged: Path, target: Path) -> None:
    """Versions are added (never overwritten); config.json and model-level files replace the ones there,
    and the ``warmup/`` folder is merged file by file."""
    for child in sorted(staged.iterdir()):
        destination = target / child.name
        if child.name == WARMUP_FOLDER and child.is_dir() and destination.is_dir() and not destination.is_symlink():
            _move_children_replacing(child, destination)
            fsync_dir(destination)
        elif child.is_file() and not destination.is_dir():
            os.replace(child, destination)  # config.json or a label file
        elif destination.exists():
            log.warning("not publishing %s: %s already exists", child.name, destination)
        else:
            os.rename(child, destination)


def _move_children_replacing(staged: Path, target: Path) -> None:
    for child in sorted(staged.iterdir()):
        if not (target / child.name).is_dir():
            os.replace(child, target / child.name)


def check_samples(path: Path, label: str) -> None:
    """``samples.npz``: read exactly as the optimizer will read it (its size cap, no pickled objects), so an
    upload the optimizer would refuse is refused here, with a 400."""
    try:
        load_npz(path)
    except OptimizeError as exc:
        raise InvalidInput(f"{label}: not a .npz of plain arrays the optimizer can read ({exc})") from None


def recover_staging(root: Path) -> None:
    """At start: finish committed uploads, delete unfinished ones (and withdrawn leftovers). Several servers
    may share the repository: a staging folder whose lock a live server holds (an upload in flight) is left
    alone; the lock of a server that died went with its process."""
    for txn in staging_entries(root):
        lock = _try_lock(txn)
        if lock is None:
            log.info("left the staging folder %s alone: a live server is using it", txn.name)
            continue
        try:
            _recover(txn, root)
        finally:
            if lock >= 0:
                os.close(lock)


def _recover(txn: Path, root: Path) -> None:
    if (txn / MARKER).is_file():
        try:
            with publish_lock(root):
                apply_committed(txn, root)
            log.info("finished publishing an interrupted upload (%s)", txn.name)
        except (OSError, ValueError, KeyError, InvalidInput) as exc:
            log.error("could not finish the interrupted upload %s: %s", txn, exc)
    else:
        _remove(txn)
        log.info("removed an unfinished upload from staging (%s)", txn.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def staging_entries(root: Path) -> list[Path]:
    """What is in ``.staging`` besides the publish lock: uploads in flight, committed or abandoned."""
    staging = root / STAGING
    if not staging.is_dir():
        return []
    return sorted(p for p in staging.iterdir() if p.name != PUBLISH_LOCK)


@contextmanager
def publish_lock(root: Path) -> Iterator[None]:
    """Hold the repository-wide publish lock (blocking; publishing is a few renames and fsyncs)."""
    staging = root / STAGING
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(staging / PUBLISH_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def new_staging_dir(root: Path) -> tuple[Path, int]:
    """A fresh private folder under ``<root>/.staging``, and the descriptor of its lock file, held (flock)
    while this server uses it so that another server's start-up recovery leaves it alone. Another server's
    recovery may lock and delete the folder between its creation and our lock: then we start over."""
    staging = root / STAGING
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    while True:
        path = staging / uuid.uuid4().hex
        path.mkdir(mode=0o700)
        try:
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path / LOCK_FILE).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except OSError:
            pass
        os.close(fd)


def _try_lock(txn: Path) -> int | None:
    """Lock a staging folder for recovery: its lock's descriptor, -1 for an entry without one to lock (a
    stray file, or a folder whose lock file is gone), None when a live server holds it."""
    if not txn.is_dir() or txn.is_symlink():
        return -1
    try:
        fd = os.open(txn / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _numeric_folders(model_dir: Path) -> set[int]:
    """Version numbers taken in a model folder: any entry named like a version (a file too: renaming a
    version folder onto it would fail)."""
    if not model_dir.is_dir():
        return set()
    taken: set[int] = set()
    for path in model_dir.iterdir():
        try:
            taken.add(parse_positive(path.name, "version"))
        except InvalidInput:
            continue
    return taken


def write_durably(path: Path, data: bytes) -> None:
    """Write a small file and fsync it."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
