-- 0004: each shard row carries its failed samples by reason as a JSON object, the same figures as its
-- shard_failures rows, written with them at registration. Listing shards (shards, pending_shards) then
-- reads one table: aggregating shard_failures into JSON on every listing was about half of their SQL
-- time at 13k shards. shard_failures stays for the totals by reason (failures_by_reason, status_summary).
-- Shards registered before this migration get theirs from shard_failures here.

ALTER TABLE shards ADD COLUMN failures JSON DEFAULT '{}';

UPDATE shards SET failures = f.failures
FROM (
    SELECT source, shard, json_group_object(reason, samples) AS failures
    FROM shard_failures GROUP BY source, shard
) AS f
WHERE shards.source = f.source AND shards.shard = f.shard;
