"""daemon.upload: archive extraction that cannot escape its directory, and bounded writes."""
from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from daemon.errors import InvalidInput, PayloadTooLarge
from daemon.upload import (LimitedFile, UploadLimits, archive_kind, check_tree, extract_archive,
                           hoist_single_dir, safe_filename, safe_relpath)

LIMITS = UploadLimits(max_file_bytes=1 << 20, max_total_bytes=2 << 20, max_members=50)


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture()
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(outer, dest): dest is where extraction goes; outer must stay exactly as it was."""
    dest = tmp_path / "inner" / "dest"
    dest.mkdir(parents=True)
    return tmp_path, dest


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
             mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def make_zip(path: Path, files: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.create_system = 3
                info.external_attr = modes[name] << 16
            zf.writestr(info, data)
    return path


# -- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, want", [("model.onnx", "model.onnx"), ("./a/b.bin", "a/b.bin"),
                                        ("a//b", "a/b"), ("dir/", "dir")])
def test_safe_relpath_accepts(name, want):
    assert safe_relpath(name).as_posix() == want


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/..", "/etc/passwd", "//x",
                                  "a\\..\\evil", "", "a\0b", ".", "./"])
def test_safe_relpath_refuses(name):
    with pytest.raises(InvalidInput) as err:
        safe_relpath(name)
    assert err.value.code == "unsafe_path" and err.value.status == 400


def test_safe_filename_is_one_component():
    assert safe_filename("model.onnx") == "model.onnx"
    for bad in ("a/b.onnx", "../model.onnx", "/model.onnx", None):
        with pytest.raises(InvalidInput) as err:
            safe_filename(bad)
        assert err.value.code == "unsafe_path"


# -- tar --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_extracts_files_and_dirs(box, mode):
    outer, dest = box
    arc = make_tar(outer / "m.tar", [(member("model.toml"), b"engine = 'onnx'\n"),
                                     (member("sub", tarfile.DIRTYPE), None),
                                     (member("sub/w.bin"), b"\1" * 1000)], mode)
    assert archive_kind(arc) == "tar"
    assert sorted(extract_archive(arc, dest, LIMITS)) == ["model.toml", "sub/w.bin"]
    assert (dest / "sub" / "w.bin").read_bytes() == b"\1" * 1000


@pytest.mark.parametrize("bad, code", [
    (member("../escape.txt"), "unsafe_path"),
    (member("ok/../../escape.txt"), "unsafe_path"),
    (member("/tmp/ferry-absolute-escape.txt"), "unsafe_path"),
    (member("link", tarfile.SYMTYPE, "/etc/passwd"), "unsafe_member"),
    (member("link", tarfile.SYMTYPE, "model.toml"), "unsafe_member"),
    (member("hard", tarfile.LNKTYPE, "model.toml"), "unsafe_member"),
    (member("dev", tarfile.CHRTYPE), "unsafe_member"),
    (member("blk", tarfile.BLKTYPE), "unsafe_member"),
    (member("fifo", tarfile.FIFOTYPE), "unsafe_member"),
])
def test_tar_refuses_escapes_and_special_files(box, bad, code):
    outer, dest = box
    before = tree(outer)
    data = b"x" if bad.type == tarfile.REGTYPE else None
    arc = make_tar(outer / "bad.tgz", [(member("model.toml"), b"a"), (bad, data)])
    before.add("bad.tgz")
    with pytest.raises(InvalidInput) as err:
        extract_archive(arc, dest, LIMITS)
    assert err.value.code == code
    # nothing outside dest appeared; inside dest at most the one good file
    assert tree(outer) - before <= {"inner/dest/model.toml"}
    assert not Path("/tmp/ferry-absolute-escape.txt").exists()


def test_tar_symlink_then_write_through_it_is_refused(box):
    """The classic: `d -> /tmp`, then `d/x`: refused at the link, before anything is written."""
    outer, dest = box
    arc = make_tar(outer / "t.tgz", [(member("d", tarfile.SYMTYPE, str(outer)), None),
                                     (member("d/pwned"), b"x")])
    with pytest.raises(InvalidInput):
        extract_archive(arc, dest, LIMITS)
    assert not (outer / "pwned").exists() and tree(dest) == set()


def test_tar_member_over_the_limit(box):
    outer, dest = box
    arc = make_tar(outer / "big.tgz", [(member("w.bin"), b"\0" * ((1 << 20) + 1))])
    with pytest.raises(PayloadTooLarge) as err:
        extract_archive(arc, dest, LIMITS)
    assert err.value.code == "upload_too_large" and err.value.status == 413
    assert tree(dest) == set()      # refused on the header, before writing


def test_tar_total_over_the_limit(box):
    outer, dest = box
    arc = make_tar(outer / "many.tgz", [(member(f"w{i}.bin"), b"\0" * (900 << 10))
                                        for i in range(3)])
    with pytest.raises(PayloadTooLarge, match="extracted archive"):
        extract_archive(arc, dest, LIMITS)


def test_tar_with_too_many_members(box):
    outer, dest = box
    arc = make_tar(outer / "n.tar", [(member(f"f{i}"), b"") for i in range(51)], "w")
    with pytest.raises(InvalidInput) as err:
        extract_archive(arc, dest, LIMITS)
    assert err.value.code == "invalid_archive"


def test_tar_duplicate_and_file_dir_clash(box):
    outer, dest = box
    arc = make_tar(outer / "d.tgz", [(member("a"), b"1"), (member("a"), b"2")])
    with pytest.raises(InvalidInput) as err:
        extract_archive(arc, dest, LIMITS)
    assert err.value.code == "duplicate_file"
    dest2 = outer / "dest2"
    dest2.mkdir()
    arc = make_tar(outer / "c.tgz", [(member("a"), b"1"), (member("a/b"), b"2")])
    with pytest.raises(InvalidInput) as err:
        extract_archive(arc, dest2, LIMITS)
    assert err.value.code == "invalid_archive"


@pytest.mark.parametrize("data", [b"\x1f\x8b\x08\x00garbage-after-a-gzip-magic" * 3,
                                  b"plain text, not an archive", b""])
def test_corrupt_or_unknown_archives(box, data):
    outer, dest = box
    (outer / "x.bin").write_bytes(data)
    with pytest.raises(InvalidInput) as err:
        extract_archive(outer / "x.bin", dest, LIMITS)
    assert err.value.code == "invalid_archive"


def test_truncated_tar_gz(box):
    outer, dest = box
    arc = make_tar(outer / "t.tgz", [(member("w.bin"), os.urandom(200_000))])
    arc.write_bytes(arc.read_bytes()[:50_000])
    with pytest.raises(InvalidInput) as err:
        extract_archive(arc, dest, LIMITS)
    assert err.value.code == "invalid_archive"


# -- zip --------------------------------------------------------------------------------------------

def test_zip_extracts(box):
    outer, dest = box
    arc = make_zip(outer / "m.zip", {"m/model.toml": b"a", "m/w/x.bin": b"b"})
    assert archive_kind(arc) == "zip"
    assert sorted(extract_archive(arc, dest, LIMITS)) == ["m/model.toml", "m/w/x.bin"]
    hoist_single_dir(dest)
    assert tree(dest) == {"model.toml", "w", "w/x.bin"}


@pytest.mark.parametrize("files, modes, code", [
    ({"../escape.txt": b"x"}, None, "unsafe_path"),
    ({"/abs/escape.txt": b"x"}, None, "unsafe_path"),
    ({"a\\..\\..\\escape.txt": b"x"}, None, "unsafe_path"),
    ({"link": b"/etc/passwd"}, {"link": stat.S_IFLNK | 0o777}, "unsafe_member"),
    ({"fifo": b""}, {"fifo": stat.S_IFIFO | 0o644}, "unsafe_member"),
])
def test_zip_refuses(box, files, modes, code):
    outer, dest = box
    before = tree(outer) | {"bad.zip"}
    arc = make_zip(outer / "bad.zip", files, modes)
    with pytest.raises(InvalidInput) as err:
        extract_archive(arc, dest, LIMITS)
    assert err.value.code == code
    assert tree(outer) == before


def test_zip_bomb_stops_at_the_limit(box):
    outer, dest = box
    arc = make_zip(outer / "bomb.zip", {"w.bin": b"\0" * (8 << 20)})
    assert arc.stat().st_size < 100_000
    with pytest.raises(PayloadTooLarge):
        extract_archive(arc, dest, LIMITS)


def test_zip_bomb_with_a_lying_header_stops_at_the_limit(box):
    """A header that under-states the size: the bytes written are counted, not trusted."""
    outer, dest = box
    arc = make_zip(outer / "lie.zip", {"w.bin": b"\0" * (3 << 20)})
    raw = bytearray(arc.read_bytes())
    small = (100).to_bytes(4, "little")
    real = (3 << 20).to_bytes(4, "little")
    assert raw.count(real) == 2                 # local header and central directory
    arc.write_bytes(bytes(raw).replace(real, small))
    with pytest.raises((InvalidInput, PayloadTooLarge)):
        extract_archive(arc, dest, LIMITS)
    assert all(p.stat().st_size <= LIMITS.max_file_bytes for p in dest.rglob("*") if p.is_file())


# -- helpers ------------------------------------------------------------------------------------------

def test_limited_file(tmp_path: Path):
    with LimitedFile(tmp_path / "a", 10, "the part") as f:
        f.write(b"12345")
        with pytest.raises(PayloadTooLarge) as err:
            f.write(b"678901")
    assert err.value.code == "upload_too_large" and "the part" in err.value.message
    with pytest.raises(InvalidInput) as err:
        LimitedFile(tmp_path / "a", 10, "x")
    assert err.value.code == "duplicate_file"


def test_limited_file_never_writes_through_a_symlink(tmp_path: Path):
    target = tmp_path / "outside"
    target.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(InvalidInput):
        LimitedFile(tmp_path / "link", 10, "x")
    assert target.read_bytes() == b"keep"


def test_hoist_only_a_single_directory(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("x")
    hoist_single_dir(tmp_path)
    assert tree(tmp_path) == {"a", "b"}


def test_check_tree_flags_links(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    check_tree(tmp_path)
    (tmp_path / "l").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput) as err:
        check_tree(tmp_path)
    assert err.value.code == "unsafe_member"
