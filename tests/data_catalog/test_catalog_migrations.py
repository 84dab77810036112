"""Versioned migrations: a fresh file is created at the latest version, an older one is upgraded in one
transaction, a newer one is refused."""

import shutil

import duckdb
import pytest

from data_catalog.catalog import MIGRATIONS_DIR, Catalog, CatalogError, CatalogVersionError, load_migrations

SHIPPED = load_migrations()


@pytest.fixture
def v1_dir(tmp_path):
    """A migrations folder holding only the first shipped migration: 'the code as it was at version 1'."""
    folder = tmp_path / "migrations_v1"
    folder.mkdir()
    shutil.copy(MIGRATIONS_DIR / SHIPPED[0].name, folder)
    return folder


def _with_migration(base, tmp_path, name, sql):
    folder = tmp_path / f"migrations_{name}"
    shutil.copytree(base, folder)
    (folder / name).write_text(sql)
    return folder


def _tables(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


def test_fresh_catalog_is_at_latest_shipped_version(tmp_path):
    with Catalog.open(tmp_path / "catalog.duckdb") as catalog:
        assert catalog.schema_version == SHIPPED[-1].version
        assert catalog.sources() == []
    assert {"sources", "shards", "stage_runs", "shard_stage_status", "schema_version"} <= _tables(
        tmp_path / "catalog.duckdb"
    )


def test_older_catalog_is_upgraded_and_keeps_its_data(tmp_path, v1_dir):
    path = tmp_path / "catalog.duckdb"
    with Catalog.open(path, migrations_dir=v1_dir) as catalog:
        catalog.upsert_source("coco", "coco", "/m/coco", 5, {})
        assert catalog.schema_version == 1
    v2_dir = _with_migration(
        v1_dir,
        tmp_path,
        "0002_homepage.sql",
        "ALTER TABLE sources ADD COLUMN homepage VARCHAR;\nCREATE TABLE extra (x INTEGER);",
    )
    with Catalog.open(path, migrations_dir=v2_dir) as catalog:
        assert catalog.schema_version == 2
        assert [s.name for s in catalog.sources()] == ["coco"]
    assert "extra" in _tables(path)


def test_failed_migration_leaves_the_catalog_at_its_old_version(tmp_path, v1_dir):
    path = tmp_path / "catalog.duckdb"
    Catalog.open(path, migrations_dir=v1_dir).close()
    broken = _with_migration(
        v1_dir, tmp_path, "0002_broken.sql", "CREATE TABLE half (x INTEGER);\nSELEC nonsense;"
    )
    with pytest.raises(CatalogError, match="0002_broken.sql"):
        Catalog.open(path, migrations_dir=broken)
    assert "half" not in _tables(path)
    with Catalog.open(path, migrations_dir=v1_dir) as catalog:
        assert catalog.schema_version == 1


def test_catalog_from_newer_code_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "catalog.duckdb"
    Catalog.open(path).close()
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version VALUES (999, '0999_future.sql', now())")
    con.close()
    with pytest.raises(CatalogVersionError) as err:
        Catalog.open(path)
    assert "999" in str(err.value)
    assert f"up to {SHIPPED[-1].version}" in str(err.value)
    assert str(path) in str(err.value)


def test_read_only_open_of_an_older_catalog_asks_for_a_writable_open(tmp_path, v1_dir):
    path = tmp_path / "catalog.duckdb"
    Catalog.open(path, migrations_dir=v1_dir).close()
    v2_dir = _with_migration(v1_dir, tmp_path, "0002_more.sql", "CREATE TABLE more (x INTEGER);")
    with pytest.raises(CatalogVersionError, match="without read_only"):
        Catalog.open(path, read_only=True, migrations_dir=v2_dir)


def test_migration_files_must_be_numbered_without_gaps(tmp_path, v1_dir):
    gap = _with_migration(v1_dir, tmp_path, "0003_skipped.sql", "SELECT 1;")
    with pytest.raises(CatalogError, match="0003_skipped.sql.*expected 2"):
        load_migrations(gap)
    badly_named = _with_migration(v1_dir, tmp_path, "2_oops.sql", "SELECT 1;")
    with pytest.raises(CatalogError, match="2_oops.sql"):
        load_migrations(badly_named)


def test_read_only_open_of_a_missing_file_says_to_ingest_first(tmp_path):
    path = tmp_path / "home" / "catalog.duckdb"
    with pytest.raises(CatalogError) as err:
        Catalog.open(path, read_only=True)
    assert str(err.value) == f"no catalog at {path}: run an ingest first (blip2 ingest ...)"
    assert not path.parent.exists()  # reading creates nothing


def test_upgrade_to_shards_without_foreign_keys_keeps_shard_rows(tmp_path, v1_dir, shard_maker):
    path = tmp_path / "catalog.duckdb"
    with Catalog.open(path, migrations_dir=v1_dir) as catalog:
        catalog.upsert_source("cc3m", "web", "/m", 8, {})
        shard_maker.register(catalog, "cc3m", 0)
        run = catalog.start_run("capfilt", "h", {})
        catalog.set_shard_status("capfilt", "h", "cc3m", "00000", "done", run)
        before = (catalog.shards(), catalog.shard_statuses("capfilt", "h"), catalog.failures_by_reason())
    with Catalog.open(path) as catalog:
        assert catalog.schema_version == SHIPPED[-1].version >= 2
        after = (catalog.shards(), catalog.shard_statuses("capfilt", "h"), catalog.failures_by_reason())
        assert after == before
        assert catalog.delete_source("cc3m") == 1  # what the foreign keys prevented in one transaction
        assert (catalog.sources(), catalog.shards(), catalog.shard_statuses("capfilt", "h")) == ([], [], [])


def test_upgrade_to_the_shard_failures_column_fills_it_from_shard_failures(tmp_path, shard_maker):
    v3_dir = tmp_path / "migrations_v3"
    v3_dir.mkdir()
    for migration in SHIPPED[:3]:
        shutil.copy(MIGRATIONS_DIR / migration.name, v3_dir)
    path = tmp_path / "catalog.duckdb"
    with Catalog.open(path, migrations_dir=v3_dir) as catalog:
        catalog.upsert_source("cc3m", "web", "/m", 8, {})
        shard_maker.register(catalog, "cc3m", 0)
        shard_maker.register(catalog, "cc3m", 1, (("success", None),))
        before = catalog.shards()
    assert [r.failures for r in before] == [shard_maker.expected_failures(), {}]
    with Catalog.open(path) as catalog:
        assert catalog.schema_version == SHIPPED[-1].version >= 4
        assert catalog.shards() == before
        assert catalog.pending_shards("capfilt", "h") == before
        assert catalog.failures_by_reason() == shard_maker.expected_failures()
        shard_maker.register(catalog, "cc3m", 1)  # registered again: the column is written with it
        assert catalog.shard("cc3m", "00001").failures == shard_maker.expected_failures()
