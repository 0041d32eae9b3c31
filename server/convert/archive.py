"""Archives in uploads, opened strictly: a tar is extracted only when every member is a regular file or a
folder with a plain relative name, inside caps on count, depth and size; a zip is listed (never extracted)
and checked the same way. Extended tar headers are bounded before :mod:`tarfile` reads them into memory."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from server.errors import InvalidInput, PayloadTooLarge

#: The upload file-name pattern (server.repository.modelfile imports this package, so it is not imported from
#: there).
PLAIN_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

MAX_MEMBERS = 10_000
MAX_DEPTH = 8
MAX_UNPACKED_BYTES = 16 * 2**30
MAX_EXTENDED_HEADER = 64 * 1024
_BLOCK = 512
_EXTENDED_TYPES = (b"x", b"g", b"L", b"K")
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


def member_parts(name: str, label: str, *, hidden: bool = False) -> tuple[str, ...]:
    """The components of a member name that must stay inside its folder: relative, no ``..``, no odd names
    (each part matches the upload file-name pattern; ``hidden`` also lets parts start with a dot)."""
    cleaned = name[2:] if name.startswith("./") else name
    path = PurePosixPath(cleaned.rstrip("/"))
    if not cleaned or "\\" in name or "\x00" in name or path.is_absolute() or os.path.isabs(cleaned):
        raise InvalidInput(f"{label}: member {name!r} must be a relative path")
    parts = path.parts
    if len(parts) > MAX_DEPTH or any(not _plain(part, hidden) for part in parts):
        raise InvalidInput(
            f"{label}: member {name!r} must be at most {MAX_DEPTH} plain names ({PLAIN_FILE_NAME.pattern}), no '..'"
        )
    return parts


def _plain(part: str, hidden: bool) -> bool:
    if hidden and part.startswith(".") and part not in (".", ".."):
        part = part[1:]
    return bool(PLAIN_FILE_NAME.fullmatch(part))


def check_zip(path: Path, label: str, max_unpacked: int = MAX_UNPACKED_BYTES) -> list[str]:
    """The member names of a zip whose members are all plain, unencrypted, and fit the unpacked cap."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput(f"{label}: not a readable zip archive ({exc})") from None
    if len(infos) > MAX_MEMBERS:
        raise InvalidInput(f"{label}: {len(infos)} members, at most {MAX_MEMBERS}")
    names, total = [], 0
    for info in infos:
        member_parts(info.filename, label, hidden=True)
        if info.flag_bits & 0x1:
            raise InvalidInput(f"{label}: member {info.filename!r} is encrypted")
        total += info.file_size
        names.append(info.filename)
    if total > max_unpacked:
        raise PayloadTooLarge(f"{label}: unpacks to {total} bytes, more than {max_unpacked}")
    if len(set(names)) != len(names):
        raise InvalidInput(f"{label}: a member name appears twice")
    return names


def extract_tar(path: Path, dest: Path, label: str, max_unpacked: int = MAX_UNPACKED_BYTES) -> None:
    """Extract an uncompressed tar into ``dest`` (which must not exist). Refused: links, devices, sparse or
    continued files, absolute or ``..`` names, duplicates, too many or too big members. Nothing is left
    behind on refusal."""
    _check_extended_headers(path, label)
    dest.mkdir()
    try:
        with tarfile.open(path, mode="r:") as archive:
            _extract_members(archive, dest, label, max_unpacked)
    except tarfile.TarError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InvalidInput(f"{label}: not a readable uncompressed tar archive ({exc})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def saved_model_root(folder: Path) -> Path:
    """The folder holding saved_model.pb: the extracted one, or its only subfolder."""
    if (folder / "saved_model.pb").is_file():
        return folder
    children = [p for p in folder.iterdir()]
    if len(children) == 1 and (children[0] / "saved_model.pb").is_file():
        return children[0]
    raise InvalidInput("saved_model.tar: no saved_model.pb at its top or in its only folder")


def _extract_members(archive: tarfile.TarFile, dest: Path, label: str, max_unpacked: int) -> None:
    seen: set[tuple[str, ...]] = set()
    total = 0
    for count, member in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise InvalidInput(f"{label}: more than {MAX_MEMBERS} members")
        parts = member_parts(member.name, label)
        if parts in seen:
            raise InvalidInput(f"{label}: member {member.name!r} appears twice")
        seen.add(parts)
        target = dest.joinpath(*parts)
        if member.isdir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            continue
        if member.type not in _FILE_TYPES:
            raise InvalidInput(f"{label}: member {member.name!r} is not a regular file or folder (links are refused)")
        total += member.size
        if total > max_unpacked:
            raise PayloadTooLarge(f"{label}: unpacks to more than {max_unpacked} bytes")
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _write_member(archive, member, target)


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = archive.extractfile(member)
    if source is None:
        raise InvalidInput(f"member {member.name!r} has no data")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with source, os.fdopen(fd, "wb") as out:
        remaining = member.size
        while remaining > 0:
            block = source.read(min(remaining, 1 << 20))
            if not block:
                raise InvalidInput(f"member {member.name!r} is truncated")
            out.write(block)
            remaining -= len(block)
        out.flush()
        os.fsync(out.fileno())


def _check_extended_headers(path: Path, label: str) -> None:
    """Walk the raw headers: pax and GNU long-name headers are read whole into memory by :mod:`tarfile`, so
    bound them first (and refuse compressed archives, whose headers cannot be walked without unpacking)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + _BLOCK <= size:
            handle.seek(offset)
            header = handle.read(_BLOCK)
            if header == b"\0" * _BLOCK:
                return
            if header[257:262] != b"ustar":
                raise InvalidInput(f"{label}: not an uncompressed (ustar/pax/gnu) tar archive")
            length = _header_size(header, label)
            if header[156:157] in _EXTENDED_TYPES and length > MAX_EXTENDED_HEADER:
                raise InvalidInput(f"{label}: an extended header of {length} bytes (at most {MAX_EXTENDED_HEADER})")
            offset += _BLOCK + -(-length // _BLOCK) * _BLOCK


def _header_size(header: bytes, label: str) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise InvalidInput(f"{label}: a tar header has a malformed size") from None
