"""kvmtest.outputs: atomic report files, '-' for stdout, early writability checks."""

import pytest

from kvmtest import outputs


def test_write_text_atomic(tmp_path):
    target = tmp_path / "r.json"
    outputs.write_text(str(target), "{}\n")
    assert target.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_dash_is_stdout(capsys):
    outputs.write_text("-", "hello\n")
    assert capsys.readouterr().out == "hello\n"


def test_check_writable(tmp_path):
    outputs.check_writable("-")
    outputs.check_writable(str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError):
        outputs.check_writable(str(tmp_path / "nope" / "x.json"))
    with pytest.raises(IsADirectoryError):
        outputs.check_writable(str(tmp_path))
