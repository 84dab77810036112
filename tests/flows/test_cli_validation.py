"""Bad parameters through the command line: exit code 2, the field named, and no work started."""

from __future__ import annotations

import pytest

from flows.cli import main


@pytest.fixture()
def home(tmp_path):
    return tmp_path / "var"


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *fields: str) -> None:
    assert code == 2, err
    assert "invalid parameters" in err
    for field in fields:
        assert field in err, f"{field!r} not named in:\n{err}"


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        (["--image-size", "0"], ["download.image_size", "greater than or equal to 8"]),
        (["--processes", "0", "--timeout", "-1"], ["download.processes", "download.timeout_s"]),
        (["--max-image-pixels", "0"], ["download.max_image_pixels"]),
    ],
)
def test_ingest_download_options(capsys, home, extra, fields):
    code, err = run(capsys, ["ingest", "--source", "web", "--home", str(home), *extra])
    assert_refused(code, err, *fields)
    assert not home.exists()


def test_ingest_missing_input_is_named_before_any_work(capsys, home, tmp_path, prefect_harness):
    missing = tmp_path / "nope.parquet"
    code, err = run(capsys, ["ingest", "--source", "web", "--input", str(missing), "--home", str(home)])
    assert_refused(code, err, "inputs.0", str(missing))
    assert not home.exists()  # no catalog, no manifest, no run


def test_capfilt_sampling_and_model_paths(capsys, home, tmp_path, prefect_harness):
    base = ["capfilt", "--source", "web", "--home", str(home)]
    models = ["--captioner", str(tmp_path / "cap"), "--ranker-weights", str(tmp_path / "w.safetensors")]
    code, err = run(capsys, [*base, *models, "--top-p", "1.5", "--num-captions", "0"])
    assert_refused(code, err, "sampling.top_p", "sampling.num_captions")
    code, err = run(capsys, [*base, *models])
    assert_refused(code, err, "captioner:", "ranker.weights:")
    assert not home.exists()


def test_train_numbers_weights_preset_and_folders(capsys, home, tmp_path, prefect_harness):
    base = ["train", "stage1", "--home", str(home)]
    code, err = run(capsys, [*base, "--source", "web", "--batch-size", "0", "--lr", "-1"])
    assert_refused(code, err, "batch_size", "lr")
    code, err = run(capsys, [*base, "--source", "web:heavy"])
    assert_refused(code, err, "sources.0.weight", "'heavy'")
    code, err = run(capsys, [*base, "--source", "web", "--preset", "no-such-preset"])
    assert_refused(code, err, "preset", "unknown preset")
    code, err = run(capsys, [*base, "--source", "web", "--tokenizer", str(tmp_path / "no-tokenizer")])
    assert_refused(code, err, "tokenizer:", "not an existing folder")
    assert not home.exists()


def test_demo_takes_the_teacher_set_size(capsys, home):
    code, err = run(capsys, ["demo", "--n-teacher", "-1", "--home", str(home)])
    assert_refused(code, err, "n_teacher", "greater than or equal to 0")
    assert not home.exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("teachers.profile=best", "teachers.profile='best': Input should be 'demo' or 'capfilt'"),
        ("stage1.stepz=3", "stage1.stepz: no such parameter"),
        ("stage1.steps=0", "stage1.steps=0: Input should be greater than or equal to 1"),
        ('capfilt.sampling={"top_p": 2}', "capfilt.sampling="),
    ],
)
def test_demo_checks_stage_overrides_before_any_work(capsys, home, override, named):
    code, err = run(capsys, ["demo", "--set", override, "--home", str(home)])
    assert_refused(code, err, named)
    assert not home.exists()  # not even the corpus of the first stage


def test_every_stage_override_is_checked_against_that_stage(tmp_path):
    from pydantic import ValidationError

    from flows.pipeline import STAGES, PipelineParams

    for stage in STAGES:
        PipelineParams(overrides={stage: {"home": str(tmp_path)}})  # every stage's params have a home
        with pytest.raises(ValidationError, match=rf"{stage}\.nope: no such parameter"):
            PipelineParams(overrides={stage: {"nope": 1}})
