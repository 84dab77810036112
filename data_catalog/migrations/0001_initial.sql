-- 0001: the initial catalog schema.
-- Per-sample data is not here: it stays in Parquet beside each shard and in CapFilt sidecars, and is
-- queried through read_parquet. Timestamps are UTC. JSON columns hold small dicts (params, summaries).
-- Migrations run inside the migrator's transaction: no BEGIN/COMMIT in these files.

CREATE TABLE sources (
    name          VARCHAR PRIMARY KEY,
    kind          VARCHAR NOT NULL,
    manifest_dir  VARCHAR NOT NULL,
    n_urls        BIGINT NOT NULL CHECK (n_urls >= 0),
    dropped       JSON NOT NULL,  -- manifest rows dropped before download, by reason
    updated_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE shards (
    source          VARCHAR NOT NULL REFERENCES sources (name),
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

-- Failed samples per shard and reason (data_catalog/failures.py), so totals never need the Parquet.
CREATE TABLE shard_failures (
    source   VARCHAR NOT NULL,
    shard    VARCHAR NOT NULL,
    reason   VARCHAR NOT NULL,
    samples  BIGINT NOT NULL CHECK (samples > 0),
    PRIMARY KEY (source, shard, reason),
    FOREIGN KEY (source, shard) REFERENCES shards (source, shard)
);

CREATE TABLE stage_runs (
    run_id       VARCHAR PRIMARY KEY,
    stage        VARCHAR NOT NULL,
    config_hash  VARCHAR NOT NULL,
    params       JSON NOT NULL,
    flow_run_id  VARCHAR,  -- the Prefect flow run, when run under Prefect
    status       VARCHAR NOT NULL CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ,
    summary      JSON,
    CHECK ((status = 'running') = (finished_at IS NULL))
);

-- Lets a stage resume (skip 'done') or re-run chosen shards (reset them) under one config hash.
CREATE TABLE shard_stage_status (
    stage        VARCHAR NOT NULL,
    config_hash  VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    shard        VARCHAR NOT NULL,
    status       VARCHAR NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    run_id       VARCHAR NOT NULL REFERENCES stage_runs (run_id),
    output_path  VARCHAR,
    error        VARCHAR,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (stage, config_hash, source, shard),
    FOREIGN KEY (source, shard) REFERENCES shards (source, shard)
);

CREATE TABLE checkpoints (
    run_id      VARCHAR NOT NULL REFERENCES stage_runs (run_id),
    step        BIGINT NOT NULL CHECK (step >= 0),
    path        VARCHAR NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE metrics (
    run_id     VARCHAR NOT NULL REFERENCES stage_runs (run_id),
    step       BIGINT NOT NULL CHECK (step >= 0),
    name       VARCHAR NOT NULL,
    value      DOUBLE NOT NULL,
    logged_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (run_id, step, name)
);

CREATE TABLE eval_results (
    run_id       VARCHAR NOT NULL REFERENCES stage_runs (run_id),
    task         VARCHAR NOT NULL,
    dataset      VARCHAR NOT NULL,
    metric       VARCHAR NOT NULL,
    value        DOUBLE NOT NULL,
    checkpoint   VARCHAR,  -- the evaluated weights; their lineage follows checkpoints -> stage_runs
    recorded_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (run_id, task, dataset, metric)
);
