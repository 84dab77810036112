"""Fixtures of the catalog tests: tiny img2dataset shards, written as img2dataset's webdataset writer does."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog import Catalog
from data_catalog.failures import classify_error

# (status, error_message) of each sample of a default shard, in img2dataset's vocabulary.
SAMPLES = (
    ("success", None),
    ("success", None),
    ("success", None),
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>"),
    ("failed_to_download", "The read operation timed out"),
    ("failed_to_resize", "cannot identify image file <_io.BytesIO object at 0x7f>"),
)


class Img2datasetShards:
    """Writes `<shard>.tar`, `.parquet` and `_stats.json` triples, and registers them in a catalog."""

    samples = SAMPLES

    @staticmethod
    def key(shard_id: int, index: int) -> str:
        return f"{shard_id:05d}{index:04d}"  # img2dataset's keys: shard digits then sample digits

    @staticmethod
    def expected_failures(samples=SAMPLES) -> dict[str, int]:
        return dict(Counter(classify_error(message) for status, message in samples if status != "success"))

    def write(self, folder: Path, shard_id: int = 0, samples=SAMPLES, tar_keys=None) -> Path:
        """Write one shard into `folder`; `tar_keys` overrides which samples the tar holds."""
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{shard_id:05d}"
        keys = [self.key(shard_id, i) for i in range(len(samples))]
        ok_keys = [k for k, (status, _) in zip(keys, samples, strict=True) if status == "success"]
        _write_tar(folder / f"{name}.tar", ok_keys if tar_keys is None else tar_keys)
        _write_parquet(folder / f"{name}.parquet", keys, samples)
        stats = {
            "count": len(samples),
            "successes": len(ok_keys),
            "failed_to_download": sum(s == "failed_to_download" for s, _ in samples),
            "failed_to_resize": sum(s == "failed_to_resize" for s, _ in samples),
            "duration": 1.5,
            "status_dict": {},
        }
        (folder / f"{name}_stats.json").write_text(json.dumps(stats))
        return folder / f"{name}.tar"

    def register(self, catalog: Catalog, source: str, shard_id: int = 0, samples=SAMPLES) -> Path:
        """Write a shard under the catalog's layout and register it (the source must exist)."""
        tar = self.write(catalog.layout.shards(source), shard_id, samples)
        catalog.register_img2dataset_shard(source, tar)
        return tar


def _write_tar(path: Path, keys: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, payload in (
                ("jpg", b"\xff\xd8fake-jpeg" + key.encode()),
                ("txt", b"a cat"),
                ("json", b"{}"),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _write_parquet(path: Path, keys: list[str], samples) -> None:
    ok = [status == "success" for status, _ in samples]
    table = pa.table(
        {
            "url": [f"http://example.test/{k}.jpg" for k in keys],
            "caption": [f"caption {k}" for k in keys],
            "key": keys,
            "status": [status for status, _ in samples],
            "error_message": [message for _, message in samples],
            "width": pa.array([224 if s else None for s in ok], pa.int32()),
            "height": pa.array([224 if s else None for s in ok], pa.int32()),
        }
    )
    pq.write_table(table, path)


@pytest.fixture
def shard_maker() -> Img2datasetShards:
    return Img2datasetShards()


@pytest.fixture
def catalog(tmp_path):
    """A fresh catalog at the top of `tmp_path` (its BLIP2_HOME)."""
    with Catalog.open(tmp_path / "catalog.duckdb") as cat:
        yield cat
