"""batch-infer: exit codes and one-line messages for bad invocations; a real run."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/missing", "--output", "{tmp}/o"], "does not exist"),
        (["--input", "{tmp}/empty", "--output", "{tmp}/o"], "holds no images"),
        (["--input", "{tmp}/textonly", "--output", "{tmp}/o"],
         "none with an image extension: 1 .txt). To read files whatever their names"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--model", "{tmp}/nomodel"], "No model at"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--model", "{tmp}/badmodel"], "Unreadable model"),
        (["--input", "{samples}", "--output", "{tmp}/full"], "already holds results; pass --overwrite"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--batch-size", "0"], "--batch-size must be"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--max-pixels", "-1"], "--max-pixels must be"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--decode-timeout", "0"],
         "--decode-timeout must be a positive number of seconds, got 0.0"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--infer-timeout", "-1"],
         "--infer-timeout must be a positive number of seconds, got -1.0"),
        (["--input", "{samples}", "--output", "{tmp}/o", "--device-batch-size", "48"],
         "--device-batch-size must be a positive multiple of --batch-size (32), got 48."),
        (["--input", "{samples}", "--output", "{tmp}/afile/o"], "Not a directory"),
        (["--input", "{tmp}/inputs.txt.gz", "--output", "{tmp}/o"],
         "is a list, not an image: to read the inputs it names, pass --input-list."),
        (["--input", "{samples}", "--output", "{tmp}/o", "--model-fn", "nosuch.module:build"],
         "cannot be imported"),
    ],
)
def test_bad_invocations_exit_2_with_one_line(args, message, tmp_path, sample_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "a.txt").write_text("x")
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "model.json").write_text("{not json")
    (tmp_path / "badmodel" / "weights.npz").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "afile").write_text("a file where the output's parent should be")
    (tmp_path / "inputs.txt.gz").write_bytes(b"")
    (tmp_path / "full" / "part-00000-x.parquet").write_bytes(b"")
    argv = [a.format(tmp=tmp_path, samples=sample_dir) for a in args]
    code = main(["run", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.startswith("batch-infer: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists(), "a failed invocation must not create output"


def test_overwrite_and_resume_are_exclusive(tmp_path, sample_dir):
    result = run_cli("run", "--input", str(sample_dir), "--output", str(tmp_path / "o"),
                     "--overwrite", "--resume")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_help_explains_every_run_flag():
    """Every option of ``batch-infer run``, enumerated from its parser (not from a list here),
    shows in ``batch-infer run --help`` with its own non-empty explanation. Rules out a flag
    added without help text, or hidden from the help (``argparse.SUPPRESS``)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    options = [a for a in run._actions if a.option_strings]
    assert len(options) >= 19
    result = run_cli("run", "--help")
    assert result.returncode == 0
    squeezed = "".join(result.stdout.split())  # the help wraps lines (and at hyphens)
    for action in options:
        flags = "/".join(action.option_strings)
        assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), (
            f"{flags} has no help text")
        for flag in action.option_strings:
            assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", result.stdout), f"{flag} not shown"
        explanation = run._get_formatter()._expand_help(action)  # %(default)s filled in
        assert "".join(explanation.split()) in squeezed, f"{flags}: its help is not shown"


def test_run_with_error_rows_exits_0(ray_local, sample_dir, tmp_path):
    """A real CLI process joining the test's Ray; a bad image still means success."""
    src = tmp_path / "in"
    src.mkdir()
    for p in list(sample_dir.rglob("*.png"))[:5]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "zero.png").write_bytes(b"")
    result = run_cli("run", "--input", str(src), "--output", str(tmp_path / "o"),
                     "--address", ray_local)
    assert result.returncode == 0, result.stderr
    assert "rows: 6 (5 ok, 1 error)" in result.stdout
    rows = pq.read_table(tmp_path / "o").to_pylist()
    assert {r["path"].rsplit("/", 1)[1]: r["status"] for r in rows}["zero.png"] == "error"


def test_sample_data_layout(tmp_path):
    assert main(["sample-data", str(tmp_path / "s"), "--count", "12"]) == 0
    files = sorted((tmp_path / "s").rglob("*.*"))
    assert len(files) == 12
    assert all(f.parent.name.isdigit() and f.suffix in (".png", ".jpg") for f in files)


def test_local_paths_reach_the_workers_absolute(tmp_path, monkeypatch):
    """Ray's workers may run in another directory (a joined head): a relative path is
    resolved where the command runs; URIs, and a model name a factory takes, stay as given."""
    from pipeline.config import RunConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    cfg = RunConfig(input="imgs/**/*.png", output="out", model="ckpt").resolved()
    assert (cfg.input, cfg.output, cfg.model) == (
        f"{tmp_path}/imgs/**/*.png", f"{tmp_path}/out", f"{tmp_path}/ckpt")
    kept = RunConfig(input="s3://b/in", output="file:///x/out", model="resnet-tiny").resolved()
    assert (kept.input, kept.output, kept.model) == ("s3://b/in", "file:///x/out", "resnet-tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunConfig(input="~/imgs", output="o").resolved().input == f"{tmp_path}/imgs"


def test_version_names_the_tool_and_what_it_runs_on(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"batch-infer {importlib.metadata.version('batch-infer')} (python "
                          f"{platform.python_version()}, ")
    for name in ("ray", "jax", "jaxlib", "pyarrow", "pillow", "pillow-heif"):
        assert f" {name} {importlib.metadata.version(name)}" in out, name
