"""saefast.utils: the shared output-folder policy, damaged files, full disks."""
import errno

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from saefast.utils import (OUTPUT_MARKER, CorruptFileError, DiskFullError, is_disk_full, load_safetensors, load_torch,
                           output_folder, reporting_disk_full, write_atomic)


def _write(out, kind="report", overwrite=False, text="v1"):
    with output_folder(out, kind, overwrite) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "pages").mkdir()
        (tmp / "pages" / "p1.html").write_text(text)


def test_output_folder_replaces_only_its_own_kind_and_files(tmp_path):
    out = tmp_path / "out"
    _write(out)
    assert (out / "a.txt").read_text() == "v1" and (out / OUTPUT_MARKER).is_file()
    with pytest.raises(ValueError, match="already exists and is not empty"):
        _write(out, text="v2")
    _write(out, overwrite=True, text="v2")
    assert (out / "pages" / "p1.html").read_text() == "v2"
    with pytest.raises(ValueError, match="holds a saefast report, not a cache"):
        _write(out, kind="cache", overwrite=True)
    (out / "pages" / "extra.html").write_text("user")
    with pytest.raises(ValueError, match="extra.html"):
        _write(out, overwrite=True, text="v3")
    assert (out / "a.txt").read_text() == "v2" and (out / "pages" / "extra.html").read_text() == "user"


def test_output_folder_failure_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    _write(out)
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(out, "report", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folder_refuses_files_and_foreign_folders(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _write(target, overwrite=True)
    assert target.read_bytes() == b"\x00\x01"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / ".hidden").write_text("x")
    with pytest.raises(ValueError, match="did not write"):
        _write(foreign, overwrite=True)
    assert (foreign / ".hidden").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# damaged files and full disks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0, 7, 100, -1])
def test_truncated_files_are_named_with_the_fix(tmp_path, cut):
    weights = tmp_path / "w.safetensors"
    save_file({"W": torch.randn(40, 50)}, str(weights))
    pt = tmp_path / "state.pt"
    torch.save({"step": 3, "t": torch.randn(40, 50)}, pt)
    for path, load in ((weights, load_safetensors), (pt, load_torch)):
        data = path.read_bytes()
        path.write_bytes(data[:cut if cut >= 0 else len(data) - 1])
        with pytest.raises(CorruptFileError, match=f"{path} is truncated or damaged.*; restore it") as info:
            load(path, "restore it")
        assert isinstance(info.value, ValueError) and info.value.path == path
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "missing.pt")


def test_full_disks_are_recognised_from_python_torch_and_safetensors(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    target = tmp_path / "out.json"
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {target}") as info:
        with reporting_disk_full(target):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert "last" in str(info.value.with_note("the last checkpoint is x"))
    with pytest.raises(PermissionError):  # other errors pass unchanged
        with reporting_disk_full(target):
            raise PermissionError(errno.EACCES, "Permission denied")

    def fill(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    target.write_text("old")
    with pytest.raises(DiskFullError, match=str(target)):
        write_atomic(target, fill)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
