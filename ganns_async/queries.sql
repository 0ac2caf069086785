-- Every query ganns-async runs, by name. Loaded once by ganns_async/db.py;
-- Python never builds SQL from strings. Schema: sql/NNN_*.sql.

-- name: migrations_table_exists
SELECT to_regclass('ganns_migrations') IS NOT NULL;

-- name: applied_migrations
SELECT name, checksum, applied_at FROM ganns_migrations ORDER BY name;

-- name: record_migration_checksum
UPDATE ganns_migrations SET checksum = $2 WHERE name = $1;

-- name: lock_migrations
-- Two `db migrate` at once must not interleave (released when the connection closes).
SELECT pg_advisory_lock(7218455501);

-- name: rollback
-- After a migration file failed inside its own BEGIN.
ROLLBACK;

-- name: server_version
SELECT current_setting('server_version');

-- name: create_run
INSERT INTO runs (config, dataset_fingerprint, dataset_size)
VALUES ($1::jsonb, $2, $3)
RETURNING *;

-- name: get_run
SELECT * FROM runs WHERE id = $1;

-- name: latest_run
SELECT * FROM runs ORDER BY id DESC LIMIT 1;

-- name: active_run
-- The run workers should join: the newest one that is not over.
SELECT * FROM runs WHERE status IN ('running', 'paused') ORDER BY id DESC LIMIT 1;

-- name: set_run_status
UPDATE runs SET status = $2, updated_at = now() WHERE id = $1 RETURNING *;

-- name: insert_weights
INSERT INTO weights (run_id, version, payload, optimizer)
VALUES ($1, $2, $3, $4)
ON CONFLICT (run_id, version)
DO UPDATE SET payload = EXCLUDED.payload, optimizer = EXCLUDED.optimizer, created_at = now();

-- name: weights_payload
SELECT payload FROM weights WHERE run_id = $1 AND version = $2;

-- name: latest_saved_state
-- What --resume starts from: the newest announced version with Adam state saved
-- (--state-every), or failing that the newest one.
SELECT version, payload, optimizer FROM weights
 WHERE run_id = $1 AND version <= $2
 ORDER BY (optimizer IS NOT NULL) DESC, version DESC
 LIMIT 1;
-- name: set_run_position
-- Announces version $2 (the runs trigger notifies ganns_weights). Every value is absolute,
-- so repeating it after a lost connection changes nothing.
UPDATE runs
   SET step = $2, next_seq = $3, images_seen = $4, updated_at = now()
 WHERE id = $1;
-- name: retarget_pending_units
-- Units nobody has started yet are computed on the newest weights instead.
UPDATE work_units SET version = $2
 WHERE run_id = $1 AND state = 'pending' AND version < $2;

-- name: insert_units
-- One statement for the whole batch: the trigger sends one notification.
INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed)
SELECT $1,
       (u ->> 'seq')::bigint,
       (u ->> 'step')::integer,
       (u ->> 'version')::integer,
       (u ->> 'epoch')::integer,
       ARRAY(SELECT jsonb_array_elements_text(u -> 'indices')::integer),
       (u ->> 'noise_seed')::bigint
  FROM jsonb_array_elements($2::jsonb) AS u;

-- name: insert_metrics
INSERT INTO metrics (run_id, step, epoch, images, units, g_loss, d_loss, d_x, d_g_z, swd)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (run_id, step) DO UPDATE
   SET epoch = EXCLUDED.epoch, images = EXCLUDED.images, units = EXCLUDED.units,
       g_loss = EXCLUDED.g_loss, d_loss = EXCLUDED.d_loss, d_x = EXCLUDED.d_x,
       d_g_z = EXCLUDED.d_g_z, swd = COALESCE(EXCLUDED.swd, metrics.swd);

-- name: record_swd
INSERT INTO metrics (run_id, step, epoch, images, units, swd)
VALUES ($1, $2, 0, 0, 0, $3)
ON CONFLICT (run_id, step) DO UPDATE SET swd = EXCLUDED.swd;

-- name: run_metrics
SELECT * FROM metrics WHERE run_id = $1 ORDER BY step;

-- name: prune_weights
-- Keep only versions that live units may still need, and the one --resume starts from.
DELETE FROM weights WHERE run_id = $1 AND version < $2 AND version <> $3;
-- name: prune_optimizer_state
-- Adam state is needed for the newest saved version only (resume).
UPDATE weights SET optimizer = NULL
 WHERE run_id = $1 AND version < $2 AND optimizer IS NOT NULL;

-- name: save_state
-- Adam state for an already published version (when the coordinator stops between saves).
UPDATE weights SET optimizer = $3 WHERE run_id = $1 AND version = $2;

-- name: vacuum_blobs
-- Deleted blobs leave dead TOAST chunks that default autovacuum reaches only after
-- minutes (tens of MB a second are deleted here). Vacuuming right after each prune makes
-- their space reusable for the next step's blobs, so the tables stay at their working
-- size. SKIP_LOCKED: never wait behind anyone; the next step tries again.
VACUUM (SKIP_LOCKED) weights, gradients, work_units;

-- name: online_workers
SELECT count(*) FROM workers
 WHERE run_id = $1 AND state <> 'offline' AND last_seen > now() - make_interval(secs => $2);
-- name: online_workers_any
-- Workers online whatever run they last worked on: the next round's width when
-- --units-per-step is auto (a waiting worker joins the active run when it sees it).
SELECT count(*) FROM workers
 WHERE state <> 'offline' AND last_seen > now() - make_interval(secs => $1);
-- name: queued_rounds
-- The rounds planned from step $2 on: where each starts in the schedule and how wide it is.
SELECT step, min(seq) AS start, count(*) AS width FROM work_units
 WHERE run_id = $1 AND step >= $2
 GROUP BY step ORDER BY step;
-- name: prune_units
DELETE FROM work_units
 WHERE run_id = $1 AND step < $2 AND state IN ('used', 'cancelled');

-- name: delete_weights_after
-- A crash between writing weights and announcing them leaves a version nobody uses;
-- a rewind to the last saved state drops the versions after it.
DELETE FROM weights WHERE run_id = $1 AND version > $2;

-- name: delete_units_from
-- Rewinding to version $2: the units of steps from $2 on are planned again.
DELETE FROM work_units WHERE run_id = $1 AND step >= $2;
-- name: requeue_lost_units
-- On resume: gradients already folded into the lost in-memory sum ('used' units of
-- open steps), and gradients lost with an unlogged table after a server crash, are
-- recomputed. Units that are merely claimed keep their lease.
UPDATE work_units AS u
   SET state = 'pending', worker_id = NULL, lease_until = NULL
 WHERE u.run_id = $1 AND u.step >= $2
   AND (u.state = 'used'
        OR (u.state = 'done' AND NOT EXISTS (SELECT 1 FROM gradients AS g WHERE g.unit_id = u.id)))
RETURNING u.id;

-- name: requeue_expired_leases
-- A lease holder that is finishing right now holds the row lock: skip it, not wait.
WITH expired AS (
    SELECT id, worker_id FROM work_units
     WHERE run_id = $1 AND state = 'claimed' AND lease_until < now()
     FOR UPDATE SKIP LOCKED
)
UPDATE work_units AS u
   SET state = 'pending', worker_id = NULL, lease_until = NULL
  FROM expired AS e
  LEFT JOIN workers AS w ON w.id = e.worker_id
 WHERE u.id = e.id
RETURNING u.id, u.step, e.worker_id, w.name AS worker_name;

-- name: pending_gradients
SELECT g.id, g.unit_id, g.worker_id, g.version, g.n_samples,
       u.step, u.state AS unit_state, u.version AS unit_version, w.name AS worker_name
  FROM gradients AS g
  JOIN work_units AS u ON u.id = g.unit_id
  LEFT JOIN workers AS w ON w.id = g.worker_id
 WHERE g.run_id = $1
 ORDER BY g.unit_id;

-- name: gradient_payload
SELECT payload FROM gradients WHERE id = $1;

-- name: consume_gradient
WITH gone AS (DELETE FROM gradients WHERE id = $1)
UPDATE work_units SET state = 'used' WHERE id = $2;

-- name: reject_gradient
-- The unit goes back to pending (the update trigger wakes the workers), unless it has
-- failed $6 times already: a unit that always yields a bad gradient is given up on, so it
-- cannot keep the whole class busy recomputing it.
WITH gone AS (DELETE FROM gradients WHERE id = $1),
     logged AS (INSERT INTO rejections (run_id, unit_id, worker_id, reason) VALUES ($3, $2, $4, $5))
UPDATE work_units
   SET state = CASE WHEN attempts >= $6 THEN 'cancelled' ELSE 'pending' END,
       worker_id = NULL, lease_until = NULL
 WHERE id = $2
RETURNING state;

-- name: drop_gradient
-- Its step already closed: too stale to count.
WITH gone AS (DELETE FROM gradients WHERE id = $1)
UPDATE work_units SET state = 'cancelled' WHERE id = $2;

-- name: cancel_open_units
-- A step closed on its deadline: its missing units are no longer wanted.
WITH cancelled AS (
    UPDATE work_units SET state = 'cancelled', lease_until = NULL
     WHERE run_id = $1 AND step = $2 AND state IN ('pending', 'claimed', 'done')
    RETURNING id
)
DELETE FROM gradients WHERE unit_id IN (SELECT id FROM cancelled);

-- name: unit_counts
SELECT state, count(*) AS n FROM work_units WHERE run_id = $1 GROUP BY state;

-- name: insert_event
INSERT INTO events (run_id, kind, message) VALUES ($1, $2, $3);

-- name: recent_events
SELECT kind, message, extract(epoch FROM now() - created_at)::float8 AS age_s
  FROM events WHERE run_id = $1 ORDER BY id DESC LIMIT $2;

-- name: dashboard_workers
-- Workers of a run, plus workers waiting for one; ages computed by the server's clock.
SELECT id, name, device, state, units_done, images_done,
       extract(epoch FROM now() - last_seen)::float8 AS last_seen_s,
       extract(epoch FROM last_seen - joined_at)::float8 AS alive_s
  FROM workers
 WHERE run_id = $1 OR (run_id IS NULL AND state <> 'offline')
 ORDER BY images_done DESC, id;

-- name: recent_metrics
SELECT step, g_loss, d_loss, d_x, d_g_z, swd, images,
       extract(epoch FROM created_at)::float8 AS at,
       extract(epoch FROM now() - created_at)::float8 AS age_s
  FROM (SELECT * FROM metrics WHERE run_id = $1 ORDER BY step DESC LIMIT $2) AS recent
 ORDER BY step;

-- name: ping
SELECT 1;

-- name: register_worker
INSERT INTO workers (name, hostname, device, cpu_info, gpu_info)
VALUES ($1, $2, $3, $4, $5)
RETURNING id;

-- name: worker_heartbeat
UPDATE workers SET last_seen = now(), state = $2, run_id = $3 WHERE id = $1;

-- name: worker_offline
UPDATE workers SET last_seen = now(), state = 'offline' WHERE id = $1;

-- name: extend_lease
UPDATE work_units SET lease_until = now() + make_interval(secs => $3)
 WHERE id = $1 AND worker_id = $2 AND state = 'claimed'
RETURNING id;

-- name: claim_unit
-- SKIP LOCKED: concurrent claimers never wait on, or double-claim, the same row.
UPDATE work_units
   SET state = 'claimed', worker_id = $2, lease_until = now() + make_interval(secs => $3),
       claimed_at = now(), attempts = attempts + 1
 WHERE id = (SELECT id FROM work_units
              WHERE run_id = $1 AND state = 'pending'
              ORDER BY id
              LIMIT 1
              FOR UPDATE SKIP LOCKED)
   AND state = 'pending'
RETURNING id, run_id, seq, step, version, epoch, indices, noise_seed,
          -- which publication of the version: a rewound run publishes it again, maybe different
          (SELECT w.created_at FROM weights AS w
            WHERE w.run_id = work_units.run_id AND w.version = work_units.version) AS weights_at;

-- name: mark_unit_done
-- Only the lease holder may finish a unit; a lost lease returns no row.
UPDATE work_units SET state = 'done', done_at = now(), lease_until = NULL
 WHERE id = $1 AND worker_id = $2 AND state = 'claimed'
RETURNING run_id, version;

-- name: insert_gradient
INSERT INTO gradients (unit_id, run_id, worker_id, version, n_samples, payload)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: credit_worker
UPDATE workers
   SET units_done = units_done + 1, images_done = images_done + $2, last_seen = now()
 WHERE id = $1;

-- name: release_my_units
-- On exit: whatever this worker still holds goes back, even a claim it never saw answered.
UPDATE work_units SET state = 'pending', worker_id = NULL, lease_until = NULL
 WHERE worker_id = $1 AND state = 'claimed'
RETURNING id;

-- name: pause_run
-- Only a running run is paused: a newer coordinator may have taken over or stopped it.
UPDATE runs SET status = 'paused', updated_at = now() WHERE id = $1 AND status = 'running';

-- name: try_lock_run
-- One coordinator per run: a session-level lock held on a dedicated connection.
SELECT pg_try_advisory_lock(72184555, $1::integer);

-- name: release_unit
UPDATE work_units SET state = 'pending', worker_id = NULL, lease_until = NULL
 WHERE id = $1 AND worker_id = $2 AND state = 'claimed';

-- name: worker_rank
SELECT (SELECT count(*) FROM workers WHERE run_id = $1 AND images_done > me.images_done) + 1 AS rank,
       (SELECT count(*) FROM workers WHERE run_id = $1 AND state <> 'offline') AS total
  FROM workers AS me
 WHERE me.id = $2;

-- name: workers_for_run
SELECT * FROM workers WHERE run_id = $1 ORDER BY id;
