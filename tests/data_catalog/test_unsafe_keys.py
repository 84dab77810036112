"""Sample keys from outside that would name a path outside a folder are refused where they enter."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip2_core.capfilt import ShardReadError, read_shard, read_sidecar
from blip2_core.fileio import UnsafeKeyError
from data_catalog import ShardIntegrityError
from data_catalog.shard_files import scan_tar
from flows.download import DownloadOptions
from flows.retry import retry_shard_failures


def write_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return path


@pytest.mark.parametrize("bad", ["../00001.jpg", "/tmp/00001.jpg", "a/../../00001.jpg"])
def test_shard_registration_and_capfilt_refuse_climbing_member_names(tmp_path, bad):
    tar = write_tar(tmp_path / "00000.tar", ["00000.jpg", "00000.txt", bad])
    with pytest.raises(ShardIntegrityError, match="climbs out|absolute path"):
        scan_tar(tar)
    with pytest.raises(ShardReadError):
        list(read_shard(tar))
    ok = write_tar(tmp_path / "ok.tar", ["00000.jpg", "00000.txt", "sub/00001.jpg"])
    assert scan_tar(ok).keys == {"00000", "sub/00001"}


def test_a_sidecar_with_a_climbing_key_is_refused(tmp_path):
    table = pa.table(
        {"key": ["00000", "../../x"], "top1": ["a", "b"], "top2": ["c", "d"], "error": [None, None]}
    )
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(UnsafeKeyError):
        read_sidecar(tmp_path / "s.parquet")


def test_retry_refuses_a_shard_parquet_with_a_climbing_key_before_downloading(tmp_path):
    write_tar(tmp_path / "00000.tar", ["00000.jpg"])
    rows = {
        "key": ["00000", "../../etc/cron.d/x"],
        "url": ["http://a/1", "http://a/2"],
        "caption": ["a", "b"],
        "status": ["success", "failed_to_download"],
        "error_message": [None, "<urlopen error timed out>"],
    }
    pq.write_table(pa.table(rows), tmp_path / "00000.parquet")
    with pytest.raises(UnsafeKeyError):
        retry_shard_failures(tmp_path, "00000", DownloadOptions(processes=1), {"timeout"})
    assert not (tmp_path / "_retry").exists()  # refused before any download or staging
