-- 0002: shards, shard_failures and shard_stage_status lose their foreign keys to sources and shards.
-- DuckDB checks a foreign key against the referencing table's index, which does not see deletions made
-- earlier in the same transaction: deleting a shard's failures and then the shard, in one transaction,
-- fails. Catalog.delete_source must do exactly that, so the catalog code checks these references instead
-- (register_img2dataset_shard: the source exists; set_shard_status: the shard is registered).
-- DuckDB cannot drop a constraint, so the three tables are rebuilt with the same columns and checks.

CREATE TEMP TABLE old_shards AS SELECT * FROM shards;
CREATE TEMP TABLE old_shard_failures AS SELECT * FROM shard_failures;
CREATE TEMP TABLE old_shard_stage_status AS SELECT * FROM shard_stage_status;
DROP TABLE shard_stage_status;
DROP TABLE shard_failures;
DROP TABLE shards;

CREATE TABLE shards (
    source          VARCHAR NOT NULL,  -- a sources.name
    shard           VARCHAR NOT NULL,  -- the tar's stem, e.g. '00000'
    tar_path        VARCHAR NOT NULL,
    samples_ok      BIGINT NOT NULL CHECK (samples_ok >= 0),
    samples_failed  BIGINT NOT NULL CHECK (samples_failed >= 0),
    bytes           BIGINT NOT NULL CHECK (bytes >= 0),
    sha256          VARCHAR NOT NULL CHECK (length(sha256) = 64),
    download_s      DOUBLE,
    registered_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source, shard)
);

-- Failed samples per registered shard and reason (data_catalog/failures.py).
CREATE TABLE shard_failures (
    source   VARCHAR NOT NULL,
    shard    VARCHAR NOT NULL,
    reason   VARCHAR NOT NULL,
    samples  BIGINT NOT NULL CHECK (samples > 0),
    PRIMARY KEY (source, shard, reason)
);

CREATE TABLE shard_stage_status (
    stage        VARCHAR NOT NULL,
    config_hash  VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,  -- (source, shard) is a registered shard
    shard        VARCHAR NOT NULL,
    status       VARCHAR NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    run_id       VARCHAR NOT NULL REFERENCES stage_runs (run_id),
    output_path  VARCHAR,
    error        VARCHAR,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (stage, config_hash, source, shard)
);

INSERT INTO shards SELECT * FROM old_shards;
INSERT INTO shard_failures SELECT * FROM old_shard_failures;
INSERT INTO shard_stage_status SELECT * FROM old_shard_stage_status;
DROP TABLE old_shards;
DROP TABLE old_shard_failures;
DROP TABLE old_shard_stage_status;
