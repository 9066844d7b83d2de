"""saefast.utils: the shared output-folder policy."""
import pytest

from saefast.utils import OUTPUT_MARKER, output_folder


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
