-- ganns-async migration 002: a database that stays the same size however long a run lasts.
--
-- Every step deletes tens of MB of blobs (old weights versions, consumed gradients).
-- PostgreSQL reuses that space only after VACUUM has processed it, and autovacuum visits
-- a database at most once per autovacuum_naptime (1 minute by default, a server-wide
-- setting ops may not change): a default run grew by about 76-136 MB per step, without end.
--
-- The fix is the coordinator's: it runs `VACUUM (SKIP_LOCKED) weights, gradients,
-- work_units` right after pruning each step (queries.sql: vacuum_blobs), which kept a
-- 120-step blob workload flat at 113 MB where autovacuum alone peaked at 4.1 GB
-- (scripts/bench_db_growth.py). VACUUM needs the coordinator to own these tables; it
-- never blocks readers or writers.
--
-- This migration is the backstop for when the coordinator cannot vacuum (it is not the
-- tables' owner, or it is down while workers still write): autovacuum treats these tables
-- as soon as a handful of rows are dead, at full speed, instead of after 20% of the table.

BEGIN;

ALTER TABLE weights SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 4, autovacuum_vacuum_cost_delay = 0,
    toast.autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 64,
    toast.autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE gradients SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 4, autovacuum_vacuum_cost_delay = 0,
    toast.autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 64,
    toast.autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE work_units SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 200, autovacuum_vacuum_cost_delay = 0
);

INSERT INTO ganns_migrations (name) VALUES ('002_bounded');

COMMIT;
