"""Model uploads on disk: bounded file writes and archive extraction that cannot escape.

Everything an upload writes lands under one staging directory the caller owns (a temp directory
inside the model repository). Names are checked before anything is created: absolute paths,
`..`, backslashes and NUL bytes are refused (`unsafe_path`); only regular files and directories
are extracted: symlinks, hard links, devices and FIFOs are refused (`unsafe_member`); sizes are
counted on the bytes actually written, not on what a header claims (`upload_too_large`, 413), so
a decompression bomb stops at the limit. Files are created with O_EXCL | O_NOFOLLOW, so an
entry can neither overwrite an earlier one nor write through a link.

Supported archives: tar (plain, gzip, bzip2, xz) and zip, recognised by their bytes, not by the
file name the client sent.
"""
from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from daemon.errors import InvalidInput, PayloadTooLarge

__all__ = ["UploadLimits", "LimitedFile", "safe_relpath", "safe_filename", "archive_kind",
           "extract_archive", "hoist_single_dir", "check_tree"]

_CHUNK = 1 << 16
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(slots=True, frozen=True)
class UploadLimits:
    max_file_bytes: int              # one uploaded part, or one archive member once extracted
    max_total_bytes: int             # everything extracted from one archive
    max_members: int = 1000


class LimitedFile:
    """A new file (never an existing one, never through a link) that refuses to grow past
    `limit` bytes; the partial file is left for the caller's staging cleanup."""

    def __init__(self, path: Path, limit: int, what: str) -> None:
        self.path, self.limit, self.what = path, limit, what
        self.size = 0
        try:
            self._fd = os.open(path, _OPEN_FLAGS, 0o644)
        except FileExistsError:
            raise InvalidInput(f"{what}: {path.name!r} is given twice",
                               code="duplicate_file") from None

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise _too_large(self.what, self.limit)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LimitedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def safe_relpath(name: str) -> PurePosixPath:
    """A member name as a relative path that stays inside the extraction directory."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise _unsafe(name, "empty names and NUL bytes are not allowed")
    if "\\" in name:
        raise _unsafe(name, "backslashes (Windows path separators) are not allowed")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise _unsafe(name, "absolute paths are not allowed")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise _unsafe(name, "'..' (path traversal) is not allowed")
    if not parts:
        raise _unsafe(name, "it names no file")
    return PurePosixPath(*parts)


def safe_filename(name: str | None) -> str:
    """A single path component: the file name a client sent with an uploaded part."""
    path = safe_relpath(name or "")
    if len(path.parts) != 1:
        raise _unsafe(name, "a file part must be a plain file name (send directories as an "
                            "archive)")
    return path.parts[0]


def archive_kind(path: Path) -> str | None:
    """'tar' or 'zip' from the file's leading bytes; None for anything else."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" \
            or head[257:262] == b"ustar":
        return "tar"
    return None


def extract_archive(archive: Path, dest: Path, limits: UploadLimits) -> list[str]:
    """Extract `archive` into the existing empty directory `dest`; return the file names."""
    kind = archive_kind(archive)
    if kind is None:
        raise InvalidInput("the archive is neither a tar (.tar, .tar.gz, .tgz) nor a zip file",
                           code="invalid_archive", param="archive")
    try:
        if kind == "zip":
            return _extract_zip(archive, dest, limits)
        return _extract_tar(archive, dest, limits)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise InvalidInput(f"the archive is corrupt: {exc}", code="invalid_archive",
                           param="archive") from None
    except (NotADirectoryError, IsADirectoryError) as exc:
        raise InvalidInput(f"the archive has a file and a directory of the same name: "
                           f"{exc.filename}", code="invalid_archive", param="archive") from None


def hoist_single_dir(root: Path) -> None:
    """An archive of `mymodel/model.toml, mymodel/...` → `root/model.toml, ...`."""
    entries = list(root.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink() \
            or (root / "model.toml").exists():
        return
    inner = entries[0]
    for child in list(inner.iterdir()):
        os.rename(child, root / child.name)
    inner.rmdir()


def check_tree(root: Path) -> None:
    """Only regular files and directories under `root` (a last check before anything loads)."""
    for path in root.rglob("*"):
        mode = path.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InvalidInput(f"{path.relative_to(root)} is not a regular file",
                               code="unsafe_member", param="archive")


# -- formats ------------------------------------------------------------------------------------

def _extract_tar(archive: Path, dest: Path, limits: UploadLimits) -> list[str]:
    names: list[str] = []
    total = 0
    with tarfile.open(archive, "r:*") as tf:
        for count, member in enumerate(tf, 1):
            if count > limits.max_members:
                raise _too_many(limits.max_members)
            rel = safe_relpath(member.name)
            if member.issym() or member.islnk():
                kind = "a symlink" if member.issym() else "a hard link"
                raise _bad_member(member.name, f"{kind} (to {member.linkname!r})")
            if member.isdir():
                _mkdirs(dest, rel)
                continue
            if not member.isfile():
                raise _bad_member(member.name, "a device, FIFO or other special file")
            total = _check_sizes(member.name, member.size, total, limits)
            src = tf.extractfile(member)
            if src is None:
                raise _bad_member(member.name, "unreadable")
            with src:
                _copy(src, _target(dest, rel), limits.max_file_bytes, member.name)
            names.append(rel.as_posix())
    return names


def _extract_zip(archive: Path, dest: Path, limits: UploadLimits) -> list[str]:
    names: list[str] = []
    total = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise _too_many(limits.max_members)
        for info in infos:
            rel = safe_relpath(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _bad_member(info.filename, "a symlink")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _bad_member(info.filename, "a device, FIFO or other special file")
            if info.flag_bits & 0x1:
                raise InvalidInput(f"archive member {info.filename!r} is encrypted",
                                   code="invalid_archive", param="archive")
            if info.is_dir():
                _mkdirs(dest, rel)
                continue
            total = _check_sizes(info.filename, info.file_size, total, limits)
            with zf.open(info) as src:
                _copy(src, _target(dest, rel), limits.max_file_bytes, info.filename)
            names.append(rel.as_posix())
    return names


def _check_sizes(name: str, size: int, total: int, limits: UploadLimits) -> int:
    if size > limits.max_file_bytes:
        raise _too_large(f"archive member {name!r}", limits.max_file_bytes)
    total += size
    if total > limits.max_total_bytes:
        raise _too_large("the extracted archive", limits.max_total_bytes)
    return total


def _mkdirs(dest: Path, rel: PurePosixPath) -> Path:
    path = dest
    for part in rel.parts:
        path = path / part
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise InvalidInput(f"archive path {rel.as_posix()!r} crosses a file",
                                   code="invalid_archive", param="archive") from None
    return path


def _target(dest: Path, rel: PurePosixPath) -> Path:
    parent = _mkdirs(dest, rel.parent) if rel.parent.parts else dest
    target = parent / rel.name
    # Belt and braces: the names were checked, and nothing here creates links.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise _unsafe(rel.as_posix(), "it leads outside the upload")
    return target


def _copy(src: IO[bytes], target: Path, limit: int, name: str) -> None:
    with LimitedFile(target, limit, f"archive member {name!r}") as out:
        while chunk := src.read(_CHUNK):
            out.write(chunk)


def _too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} exceeds the upload limit of {limit} bytes",
                           code="upload_too_large")


def _too_many(limit: int) -> InvalidInput:
    return InvalidInput(f"the archive holds more than {limit} entries", code="invalid_archive",
                        param="archive")


def _unsafe(name: Any, why: str) -> InvalidInput:
    return InvalidInput(f"refused path {name!r}: {why}", code="unsafe_path",
                        param="archive")


def _bad_member(name: str, what: str) -> InvalidInput:
    return InvalidInput(f"refused archive member {name!r}: it is {what}; only regular files "
                        "and directories are accepted", code="unsafe_member", param="archive")

