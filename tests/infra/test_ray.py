"""Ray: the CapFilt cluster config (Ray's own validator) and img2dataset's Ray distributor launcher."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import INFRA, load_script

CLUSTER = yaml.safe_load((INFRA / "ray" / "capfilt-cluster.yaml").read_text())


@pytest.fixture(scope="module")
def launcher():
    return load_script(INFRA / "ray" / "img2dataset-ray.py", "img2dataset_ray")


def test_cluster_config_passes_the_ray_launcher_validation():
    from ray.autoscaler._private.util import validate_config

    validate_config(CLUSTER)  # ray-schema.json plus the launcher's own checks
    for key in (
        "cluster_name",
        "provider",
        "max_workers",
        "docker",
        "head_node_type",
        "available_node_types",
    ):
        assert key in CLUSTER, key
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert CLUSTER[key], key


def test_cluster_has_gpu_workers_in_the_pipeline_image():
    types = CLUSTER["available_node_types"]
    assert types[CLUSTER["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= 1
    docker = CLUSTER["docker"]
    assert docker["image"].endswith("/blip2:0.1.0")
    # Ray starts containers as `docker run ... IMAGE bash`; the image's entrypoint is blip2, so the
    # config must replace it, and mount BLIP2_HOME where the image expects it.
    assert "--entrypoint=/usr/bin/tini" in docker["run_options"]
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "blip2"]' in (INFRA / "Dockerfile").read_text()
    assert any(o.endswith(":/data/blip2") for o in docker["run_options"] if o.startswith("-v "))
    assert "import flows.capfilt" in " ".join(CLUSTER["setup_commands"])
    assert any("--ray-client-server-port=10001" in c for c in CLUSTER["head_start_ray_commands"])


def write_raw(path, n: int) -> None:
    table = pa.table(
        {"url": [f"file:///img/{i}.jpg" for i in range(n)], "caption": [f"c {i}" for i in range(n)]}
    )
    pq.write_table(table, path)


def test_launcher_runs_the_ingest_job_with_the_ray_distributor(launcher, tmp_path, capsys):
    from flows.download import DownloadOptions, img2dataset_kwargs
    from flows.ingest import manifest_parts

    home = tmp_path / "var"
    raw = tmp_path / "raw.parquet"
    write_raw(raw, 25)
    argv = ["--source", "web", "--home", str(home), "--input", str(raw), "--allow-local", "--dry-run"]
    assert launcher.main(argv + ["--samples-per-shard", "10", "--threads", "32"]) == 0
    job = launcher.ray_job(home, "web", DownloadOptions(processes=1, samples_per_shard=10, threads=32))
    kwargs = job["kwargs"]
    assert kwargs["distributor"] == "ray"
    assert kwargs["output_folder"] == str(home / "shards" / "web")
    # Everything else is what the ingest flow itself would run (so `blip2 ingest` resumes it).
    parts = manifest_parts(home / "manifests" / "web")
    flow_kwargs = img2dataset_kwargs(
        parts[0], home / "shards" / "web", DownloadOptions(processes=1, samples_per_shard=10, threads=32), []
    )
    assert {k: v for k, v in kwargs.items() if k != "distributor"} == {
        k: v for k, v in flow_kwargs.items() if k != "distributor"
    }
    assert kwargs["incremental_mode"] == "incremental" and kwargs["number_sample_per_shard"] == 10
    assert '"distributor": "ray"' in capsys.readouterr().out


def test_launcher_never_replaces_a_manifest(launcher, tmp_path):
    home = tmp_path / "var"
    raw = tmp_path / "raw.parquet"
    write_raw(raw, 5)
    argv = ["--source", "web", "--home", str(home), "--input", str(raw), "--allow-local", "--dry-run"]
    assert launcher.main(argv) == 0
    with pytest.raises(SystemExit, match="exists: drop --input"):
        launcher.main(argv)
    assert launcher.main(argv[:4] + ["--dry-run"]) == 0  # the existing manifest, as is
