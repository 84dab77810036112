"""DownloadOptions.distributor: which img2dataset distributor runs the shard downloads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.download import DownloadOptions, img2dataset_kwargs
from flows.ingest import ingest_config_hash


def test_one_machine_by_default():
    kw = img2dataset_kwargs("m.parquet", "out", DownloadOptions(processes=2), [])
    assert kw["distributor"] == "multiprocessing"


@pytest.mark.parametrize("distributor", ["multiprocessing", "pyspark", "ray"])
def test_the_chosen_distributor_reaches_img2dataset(distributor):
    opts = DownloadOptions(processes=16, threads=128, distributor=distributor)
    kw = img2dataset_kwargs("m.parquet", "out", opts, ["gt_caption"])
    assert kw["distributor"] == distributor
    # Everything else is the same job: only who runs the shards changes.
    same = img2dataset_kwargs("m.parquet", "out", DownloadOptions(processes=16, threads=128), ["gt_caption"])
    assert {k: v for k, v in kw.items() if k != "distributor"} == {
        k: v for k, v in same.items() if k != "distributor"
    }


def test_an_unknown_distributor_is_refused():
    with pytest.raises(ValidationError, match="distributor"):
        DownloadOptions(distributor="dask")


def test_the_distributor_does_not_change_the_ingest_config():
    # Shards downloaded on a Ray cluster are the same shards: a later one-machine ingest may resume them.
    local = ingest_config_hash("fp", DownloadOptions(processes=1))
    assert ingest_config_hash("fp", DownloadOptions(processes=1, distributor="ray")) == local
