"""The probing resizer's checks and the retry journal, without downloading anything."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from data_catalog.failures import classify_error
from flows.download import DownloadOptions, img2dataset_kwargs
from flows.image_probe import probe_image
from flows.retry import recover_interrupted_retries


def jpeg_bytes(side: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, "PNG")  # compresses to a few KB whatever the size
    return buf.getvalue()


def test_a_whole_jpeg_passes():
    assert probe_image(jpeg_bytes(), max_pixels=10_000) is None


def test_a_jpeg_cut_in_transit_is_reported_truncated():
    data = jpeg_bytes()
    for cut in (len(data) // 2, len(data) - 3, 200):
        message = probe_image(data[:cut], max_pixels=10_000)
        assert message is not None and classify_error(message) == "truncated_image", cut


def test_too_many_pixels_are_refused_from_the_header_alone():
    data = png_bytes(5000, 4000)
    assert len(data) < 200_000  # the bomb is small on the wire; decoding it would take 20 MB
    message = probe_image(data, max_pixels=19_999_999)
    assert "5000x4000" in message and classify_error(message) == "image_too_large"
    assert probe_image(data, max_pixels=20_000_000) is None


def test_bytes_pil_cannot_read_are_left_to_the_decoder():
    # The resizer's own decoder then fails them and the worker names them "not an image".
    assert probe_image(b"<html>not found</html>", max_pixels=10) is None


def test_img2dataset_kwargs_carry_the_options():
    opts = DownloadOptions(
        image_size=364,
        resize_mode="center_crop",
        samples_per_shard=7,
        processes=3,
        threads=5,
        timeout_s=1.5,
        retries=2,
    )
    kw = img2dataset_kwargs("m.parquet", "out", opts, ["gt_caption"])
    assert (kw["image_size"], kw["resize_mode"], kw["number_sample_per_shard"]) == (364, "center_crop", 7)
    assert (kw["processes_count"], kw["thread_count"], kw["timeout"], kw["retries"]) == (3, 5, 1.5, 2)
    assert kw["save_additional_columns"] == ["gt_caption"]
    assert kw["output_format"] == "webdataset" and kw["incremental_mode"] == "incremental"


def test_an_interrupted_retry_swap_is_rolled_forward(tmp_path):
    shard_dir = tmp_path / "shards"
    staging = shard_dir / "_retry" / "00003"
    staging.mkdir(parents=True)
    for suffix in (".tar", ".parquet", "_stats.json"):
        (shard_dir / f"00003{suffix}").write_text("old")
        (staging / f"00003{suffix}.new").write_text("new")
    pairs = [
        [str(staging / f"00003{s}.new"), str(shard_dir / f"00003{s}")]
        for s in (".tar", ".parquet", "_stats.json")
    ]
    # Killed after the first rename: the tar is new, the other two are not yet.
    (shard_dir / "00003.tar").write_text("new")
    (staging / "00003.tar.new").unlink()
    (shard_dir / "_retry" / "00003.commit").write_text(json.dumps(pairs))

    assert recover_interrupted_retries(shard_dir) == 1
    assert {p.name: p.read_text() for p in shard_dir.glob("00003*")} == {
        "00003.tar": "new",
        "00003.parquet": "new",
        "00003_stats.json": "new",
    }
    assert not (shard_dir / "_retry" / "00003.commit").exists()
    assert recover_interrupted_retries(shard_dir) == 0
