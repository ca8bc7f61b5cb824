"""Atomic file writes and path checks (signmask/_files.py) through save(): symlinks, FIFOs, umask, folders, errors."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

import signmask
from _util import small_ticket


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    old = signmask.Ticket({"a.weight": torch.tensor([1, 0, -1])})
    signmask.save(old, path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        signmask.save(signmask.Ticket({"a.weight": torch.tensor([0, 0, 1])}), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temp file left


def test_save_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "real.safetensors"
    signmask.save(signmask.Ticket({"a.weight": torch.tensor([1, 0, -1])}), target)
    target.chmod(0o640)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    new = signmask.Ticket({"a.weight": torch.tensor([0, -1, 1])})
    assert signmask.save(new, link) == link
    assert link.is_symlink() and link.resolve() == target
    assert torch.equal(signmask.load(target).masks["a.weight"], new.masks["a.weight"])
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.safetensors", "store"]
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["real.safetensors"]


def test_saved_file_gets_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = signmask.save(signmask.Ticket({"a.weight": torch.tensor([1])}), tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_never_sets_the_process_umask(tmp_path, monkeypatch):
    # Reading the umask means setting it: a file another thread creates meanwhile would get it.
    def umask(mask):
        raise AssertionError(f"os.umask({mask:#o}) called")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", umask)
        path = signmask.save(signmask.Ticket({"a.weight": torch.tensor([1])}), tmp_path / "p.safetensors")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_save_creates_missing_folders_and_names_a_file_in_the_way(tmp_path):
    path = signmask.save(small_ticket(), tmp_path / "a" / "b" / "t.safetensors")
    assert signmask.load(path) == small_ticket()
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="'.*f' is not a folder"):
        signmask.save(small_ticket(), tmp_path / "f" / "g" / "t.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a", "f"] and (tmp_path / "f").read_bytes() == b"x"


def test_save_onto_a_folder_names_the_given_path_and_leaves_it(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match=rf"Is a directory: '{tmp_path / 'adir'}'$"):
        signmask.save(small_ticket(), tmp_path / "adir")
    assert os.listdir(tmp_path) == ["adir"] and os.listdir(tmp_path / "adir") == []


@pytest.mark.parametrize("fail", ["open", "replace"])
def test_save_errors_name_the_given_path_not_the_temp_file(tmp_path, monkeypatch, fail):
    # As in a read-only folder (which root, running these tests, can write into anyway).
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".t.safetensors.x1y2.tmp"))

    monkeypatch.setattr(os, fail, refused)  # creating the temp file, or renaming it
    with pytest.raises(PermissionError, match=rf"^\[Errno 13\] Permission denied: '{tmp_path / 't.safetensors'}'$"):
        signmask.save(small_ticket(), tmp_path / "t.safetensors")
    assert os.listdir(tmp_path) == []


def test_a_folder_save_cannot_create_is_reported_with_the_given_path(tmp_path, monkeypatch):
    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    path = tmp_path / "sub" / "t.safetensors"
    message = rf"^\[Errno 13\] cannot create its folder '{tmp_path / 'sub'}': Permission denied: '{path}'$"
    with pytest.raises(PermissionError, match=message):
        signmask.save(small_ticket(), path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("end", [os.sep, os.sep + ".", os.sep + "..", ""])
def test_a_path_naming_a_folder_is_refused_before_anything_is_written(tmp_path, end):
    given = str(tmp_path / "newfolder") + end if end else "."
    with pytest.raises(ValueError, match="names a folder, not a file"):
        signmask.save(small_ticket(), given)
    assert os.listdir(tmp_path) == []


def test_save_through_a_symlink_to_a_missing_folder_creates_it(tmp_path):
    link = tmp_path / "latest.safetensors"
    link.symlink_to(tmp_path / "store" / "runs" / "real.safetensors")
    assert signmask.save(small_ticket(), link) == link
    assert link.is_symlink() and signmask.load(tmp_path / "store" / "runs" / "real.safetensors") == small_ticket()
    assert os.listdir(tmp_path / "store" / "runs") == ["real.safetensors"]


def test_save_into_a_fifo_writes_through_it_and_keeps_it(tmp_path):
    # As open() and torch.save write into /dev/null or a pipe: a rename put a regular file there.
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that open() does not block
    try:
        assert signmask.save(small_ticket(), fifo) == fifo
        data = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe.safetensors"]
    (tmp_path / "copy.safetensors").write_bytes(data)
    assert signmask.load(tmp_path / "copy.safetensors") == small_ticket()


def test_save_through_a_symlink_loop_is_refused_and_keeps_the_link(tmp_path):
    # open() refuses it (ELOOP); the rename replaced the link with a regular file.
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match=rf"^\[Errno {errno.ELOOP}\] .*: '{loop}'$"):
        signmask.save(small_ticket(), loop)
    assert loop.is_symlink() and os.readlink(loop) == str(loop) and os.listdir(tmp_path) == ["loop.safetensors"]


def _refuse_writes(monkeypatch, error: int, refused) -> None:
    """Make os.open (and os.access) refuse with ``error`` what the kernel would refuse to open for
    writing: the paths for which ``refused(path, flags)`` holds."""
    real_open, real_access = os.open, os.access

    def fake_open(p, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR) and refused(os.fspath(p), flags):
            raise OSError(error, os.strerror(error), os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    def fake_access(p, mode, **kwargs):
        return not (mode & os.W_OK and refused(os.fspath(p), 0)) and real_access(p, mode, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "access", fake_access)


def test_save_onto_a_read_only_file_is_refused_and_leaves_it(tmp_path, monkeypatch):
    # open() and torch.save refuse it; the rename needed only the folder's permission.
    path = signmask.save(signmask.Ticket({"a.weight": torch.tensor([1, 0, -1])}), tmp_path / "t.safetensors")
    path.chmod(0o444)
    before = path.read_bytes()
    if os.geteuid() == 0:  # root may write any file: stand in for another user
        _refuse_writes(monkeypatch, errno.EACCES,
                       lambda p, flags: os.path.exists(p) and not os.stat(p).st_mode & 0o222)
    with pytest.raises(PermissionError, match=rf"^\[Errno 13\] Permission denied: '{path}'$"):
        signmask.save(small_ticket(), path)
    assert path.read_bytes() == before and path.stat().st_mode & 0o777 == 0o444
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_save_onto_a_file_of_a_read_only_file_system_raises_what_open_raises(tmp_path, monkeypatch):
    # open() says EROFS, for an existing file as for a new one; an os.access() check turned the
    # first into PermissionError: [Errno 13] Permission denied.
    path = signmask.save(signmask.Ticket({"a.weight": torch.tensor([1, 0, -1])}), tmp_path / "t.safetensors")
    before = path.read_bytes()
    _refuse_writes(monkeypatch, errno.EROFS, lambda p, flags: os.path.dirname(p) == str(tmp_path))
    for target in (path, tmp_path / "new.safetensors"):
        with pytest.raises(OSError, match=rf"^\[Errno {errno.EROFS}\] Read-only file system: '{target}'$") as got:
            signmask.save(small_ticket(), target)
        assert type(got.value) is OSError and got.value.errno == errno.EROFS
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.safetensors"]


def test_a_file_name_of_255_bytes_saves(tmp_path):
    path = tmp_path / ("t" * 243 + ".safetensors")
    assert signmask.load(signmask.save(small_ticket(), path)) == small_ticket()
    assert os.listdir(tmp_path) == [path.name]
