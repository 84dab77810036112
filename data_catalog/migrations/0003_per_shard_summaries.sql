-- 0003: per-shard summaries, so that per-source sample counts and CapFilt score statistics at 13k shards
-- sum small catalog rows instead of opening every shard's Parquet (about 1 ms per file before any row).
-- Both are written by the catalog code: shard_sample_status when a shard is registered (from the Parquet
-- registration reads anyway), the CapFilt tables when a shard is marked 'done' under stage 'capfilt'
-- (from its sidecar). Shards registered or done before this migration have no rows here; the questions
-- read their Parquet instead, and Catalog.backfill_summaries() writes their rows.

-- Samples per img2dataset status ('success', 'failed_to_download', ...) of a registered shard.
CREATE TABLE shard_sample_status (
    source   VARCHAR NOT NULL,
    shard    VARCHAR NOT NULL,
    status   VARCHAR NOT NULL,
    samples  BIGINT NOT NULL CHECK (samples > 0),
    PRIMARY KEY (source, shard, status)
);

-- One CapFilt sidecar's figures (errors excluded from the scores): counts, sums and extremes, so that
-- count, mean, std, min and max over many shards are exact.
CREATE TABLE capfilt_shard_summaries (
    config_hash  VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    shard        VARCHAR NOT NULL,
    samples      BIGINT NOT NULL,  -- scored samples (error IS NULL)
    errors       BIGINT NOT NULL,
    web_kept     BIGINT NOT NULL,  -- scored samples whose web caption is top1 or top2
    top1_n       BIGINT NOT NULL,  -- non-null top-1 scores
    top1_sum     DOUBLE,
    top1_sumsq   DOUBLE,
    top1_min     DOUBLE,
    top1_max     DOUBLE,
    web_n        BIGINT NOT NULL,  -- web-caption scores, NaN (unscored) left out
    web_sum      DOUBLE,
    web_sumsq    DOUBLE,
    web_min      DOUBLE,
    web_max      DOUBLE,
    PRIMARY KEY (config_hash, source, shard)
);

-- The same sidecar's scores in fixed bins over [-1, 1] (CLIP cosine similarities; a score outside
-- falls in the end bin), only the non-empty bins: quantiles over many shards come from their sum.
CREATE TABLE capfilt_shard_score_bins (
    config_hash  VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    shard        VARCHAR NOT NULL,
    bin          SMALLINT NOT NULL,
    top1         BIGINT NOT NULL,
    web          BIGINT NOT NULL,
    PRIMARY KEY (config_hash, source, shard, bin)
);
