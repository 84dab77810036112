"""The `blip2` command line: parsing, clear errors, and the catalog tables."""

from __future__ import annotations

import pytest

from data_catalog import Catalog
from data_catalog.layout import Layout
from flows.catalog_views import format_table
from flows.cli import build_parser, main


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("ingest", "demo", "corpus", "checkpoint", "catalog"):
        assert command in out


def test_bad_parameters_are_named(tmp_path, capsys):
    code = main(["ingest", "--source", "Bad Name!", "--home", str(tmp_path)])
    assert code == 2
    assert "source" in capsys.readouterr().err


def test_ingest_without_a_manifest_says_what_to_do(tmp_path, capsys):
    code = main(["ingest", "--source", "nothing", "--home", str(tmp_path)])
    assert code == 1
    assert "--input" in capsys.readouterr().err


def test_format_table_aligns_numbers_right():
    text = format_table(["name", "n"], [["a", 5], ["bbb", 123]])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "n"]
    assert lines[2] == "a       5"
    assert lines[3] == "bbb   123"


def test_catalog_commands_print_what_the_catalog_holds(tmp_path, capsys):
    layout = Layout(tmp_path)
    with Catalog.open(layout.catalog) as cat:
        cat.upsert_source("cc3m", "cc3m", str(layout.manifests("cc3m")), 1200, {"duplicate_url": 7})
        run_id = cat.start_run("stage1", "abc123", {"steps": 10})
        cat.log_metrics(run_id, 5, {"loss": 2.5})
        cat.log_metrics(run_id, 10, {"loss": 1.25})
        cat.record_eval(run_id, "retrieval", "synth", {"r1_i2t": 42.0})
        cat.finish_run(run_id, "done", {"steps": 10})

    assert main(["catalog", "status", "--home", str(tmp_path)]) == 0
    status = capsys.readouterr().out
    assert "cc3m" in status and "1200" in status and "7" in status

    assert main(["catalog", "runs", "--home", str(tmp_path)]) == 0
    assert run_id in capsys.readouterr().out

    assert main(["catalog", "metrics", run_id, "--home", str(tmp_path)]) == 0
    metrics = capsys.readouterr().out
    assert "1.25" in metrics and "2.5" not in metrics  # the last value of each metric
    assert "r1_i2t" in metrics and "42" in metrics

    assert main(["catalog", "metrics", "no-such-run", "--home", str(tmp_path)]) == 1
    assert "blip2 catalog runs" in capsys.readouterr().err


def test_parser_knows_every_download_option():
    args = build_parser().parse_args(
        ["ingest", "--source", "x", "--image-size", "364", "--timeout", "3", "--max-image-pixels", "1000"]
    )
    assert (args.image_size, args.timeout_s, args.max_image_pixels) == (364, 3.0, 1000)
