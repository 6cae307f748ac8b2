"""Safe extraction of an uploaded zip or tar (plain, gz, bz2, xz) into a batch's input folder.

Checked before a byte is written, from the archive's own index, and again while streaming
(a member's header may lie about its size): the number of members, the total expanded size, the
expansion ratio of each zip member and of a compressed tar as a whole, paths that are absolute or
climb out (``..``), and links of any kind (symlinks, hard links, device files) are refused with
``ArchiveError`` (422). A member's path inside the archive is its ``custom_id``.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

CHUNK = 1024 * 1024


class ArchiveError(ValueError):
    """The archive is refused; the message says which member and why."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_total_bytes: int
    max_ratio: float


@dataclass(frozen=True)
class Member:
    custom_id: str  # the member's path inside the archive
    path: Path  # where it was extracted


def _skipped(name: str) -> bool:
    """Folders and the clutter archivers add (macOS resource forks, dot files)."""
    parts = PurePosixPath(name).parts
    return name.endswith("/") or parts[:1] == ("__MACOSX",) or parts[-1].startswith(".")


def safe_name(name: str) -> str:
    """The member name if it stays inside the archive's root, else ``ArchiveError``."""
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"member {name!r}: backslashes and NUL are not allowed in names")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part == ".." for part in path.parts) or not path.parts:
        raise ArchiveError(f"member {name!r}: absolute paths and '..' are not allowed")
    return str(path)


def _copy_limited(source: IO[bytes], target: Path, limit: int, name: str) -> int:
    """Copy at most ``limit`` bytes; more is a lying header (or a bomb): ``ArchiveError``."""
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise ArchiveError(f"member {name!r} expands beyond the archive limits")
            out.write(chunk)
    return written


def _zip_members(archive: zipfile.ZipFile, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    infos = [i for i in archive.infolist() if not _skipped(i.filename)]
    total = 0
    for info in infos:
        safe_name(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)  # 0: no type recorded (a plain file)
        if kind and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ArchiveError(f"member {info.filename!r}: links and special files are refused")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"member {info.filename!r} is encrypted")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1024 and ratio > limits.max_ratio:
            raise ArchiveError(
                f"member {info.filename!r} expands {ratio:.0f}x (over COLORIZE_ARCHIVE_MAX_RATIO "
                f"{limits.max_ratio:g}): refused as a possible zip bomb"
            )
        total += info.file_size
    _check_totals(len(infos), total, limits)
    return infos


def _check_totals(entries: int, total: int, limits: ArchiveLimits) -> None:
    if entries > limits.max_entries:
        raise ArchiveError(
            f"the archive has {entries} members, over COLORIZE_ARCHIVE_MAX_ENTRIES "
            f"({limits.max_entries})"
        )
    if total > limits.max_total_bytes:
        raise ArchiveError(
            f"the archive expands to {total} bytes, over COLORIZE_ARCHIVE_MAX_TOTAL_BYTES "
            f"({limits.max_total_bytes})"
        )
    if entries == 0:
        raise ArchiveError("the archive holds no files")


def _extract_zip(upload: IO[bytes], target: Path, limits: ArchiveLimits) -> Iterator[Member]:
    with zipfile.ZipFile(upload) as archive:
        infos = _zip_members(archive, limits)
        for info in infos:
            if info.is_dir():
                continue
            path = target / safe_name(info.filename)
            with archive.open(info) as source:
                _copy_limited(source, path, info.file_size, info.filename)
            yield Member(safe_name(info.filename), path)


def _extract_tar(
    upload: IO[bytes], size: int, target: Path, limits: ArchiveLimits
) -> Iterator[Member]:
    with tarfile.open(fileobj=upload, mode="r:*") as archive:
        members = [m for m in archive.getmembers() if not _skipped(m.name)]
        for member in members:
            safe_name(member.name)
            if not (member.isreg() or member.isdir()):
                raise ArchiveError(f"member {member.name!r}: links and special files are refused")
        files = [m for m in members if m.isreg()]
        total = sum(m.size for m in files)
        _check_totals(len(files), total, limits)
        ratio = total / max(size, 1)
        if total > 1024 * 1024 and ratio > limits.max_ratio:
            raise ArchiveError(
                f"the archive expands {ratio:.0f}x (over COLORIZE_ARCHIVE_MAX_RATIO "
                f"{limits.max_ratio:g}): refused as a possible bomb"
            )
        for member in files:
            source = archive.extractfile(member)
            if source is None:
                raise ArchiveError(f"member {member.name!r} cannot be read")
            path = target / safe_name(member.name)
            with source:
                _copy_limited(source, path, member.size, member.name)
            yield Member(safe_name(member.name), path)


def extract_archive(
    upload: IO[bytes], size: int, target: Path, limits: ArchiveLimits
) -> list[Member]:
    """Extract ``upload`` (a seekable file of ``size`` bytes) under ``target``; on any refusal
    nothing is left behind."""
    target.mkdir(parents=True, exist_ok=False)
    try:
        upload.seek(0)
        if zipfile.is_zipfile(upload):
            upload.seek(0)
            members = list(_extract_zip(upload, target, limits))
        else:
            upload.seek(0)
            try:
                members = list(_extract_tar(upload, size, target, limits))
            except tarfile.TarError as exc:
                raise ArchiveError(f"not a zip or tar archive ({exc})") from None
        resolved = target.resolve()
        for member in members:  # belt and braces: nothing landed outside the target
            if not member.path.resolve().is_relative_to(resolved):
                raise ArchiveError(f"member {member.custom_id!r} escapes the archive root")
        return members
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ArchiveError(f"the archive is corrupt: {exc}") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
