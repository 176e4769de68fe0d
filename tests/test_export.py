"""The `export` stage (aigid.stages.export): a model directory that is no detector is one clear line."""

from click.testing import CliRunner

from aigid.cli import main


def test_export_of_a_directory_that_is_no_detector_is_one_clear_line(tmp_path):
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(tmp_path),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "portable"),
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert (
        result.output.strip() == f"Error: {tmp_path}: no model.safetensors; not a detector directory written by "
        "train or retrain"
    )
    assert not (tmp_path / "portable").exists() and not (tmp_path / "r.json").exists()
