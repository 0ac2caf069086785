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

-- name: newest_run_id
SELECT coalesce(max(id), 0) FROM runs;

-- name: run_created_since
-- After a lost reply to create_run: the run that INSERT made, if it committed. Only one
-- process can then take its lock, so two coordinators starting at once never share it.
SELECT * FROM runs
 WHERE id > $1 AND config = $2::jsonb AND dataset_fingerprint = $3 AND step = 0
 ORDER BY id DESC LIMIT 1;

-- name: get_run
SELECT * FROM runs WHERE id = $1;

-- name: latest_run
SELECT * FROM runs ORDER BY id DESC LIMIT 1;

-- name: active_run
-- The run workers should join: the newest one that is not over.
SELECT * FROM runs WHERE status IN ('running', 'paused') ORDER BY id DESC LIMIT 1;

-- name: set_run_limits
-- What ganns_api enforces for this run: the largest result blob, the longest hold of a unit.
UPDATE runs SET max_payload = $2, max_unit_s = $3 WHERE id = $1;

-- name: cancelled_units
SELECT id, step, seq, replica_of FROM work_units
 WHERE run_id = $1 AND step >= $2 AND state = 'cancelled';

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
-- A replica keeps its version: it checks a result computed on that version.
UPDATE work_units SET version = $2
 WHERE run_id = $1 AND state = 'pending' AND version < $2 AND replica_of IS NULL;

-- name: insert_units
-- One statement for the whole batch: the trigger sends one notification. A unit is its
-- place in the schedule: publishing a step again after a lost connection (the first try
-- may have committed) inserts nothing twice.
INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed)
SELECT $1,
       (u ->> 'seq')::bigint,
       (u ->> 'step')::integer,
       (u ->> 'version')::integer,
       (u ->> 'epoch')::integer,
       ARRAY(SELECT jsonb_array_elements_text(u -> 'indices')::integer),
       (u ->> 'noise_seed')::bigint
  FROM jsonb_array_elements($2::jsonb) AS u
ON CONFLICT (run_id, seq) WHERE replica_of IS NULL DO NOTHING;

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
-- A student holds at most 2 units at once (ganns_api.claim), so more of one login's workers
-- would only widen the round with units nobody can take yet; quarantined workers get none.
SELECT coalesce(sum(CASE WHEN trusted THEN n ELSE least(n, 2) END), 0)::bigint FROM (
    SELECT count(*) AS n,
           CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = login)
                THEN pg_has_role(login, 'ganns_coordinator', 'USAGE') ELSE false END AS trusted
      FROM workers
     WHERE state <> 'offline' AND quarantined_at IS NULL AND last_seen > now() - make_interval(secs => $1)
     GROUP BY login) AS per_login;
-- name: queued_rounds
-- The rounds planned from step $2 on: where each starts in the schedule and how wide it is.
SELECT step, min(seq) AS start, count(*) AS width FROM work_units
 WHERE run_id = $1 AND step >= $2 AND replica_of IS NULL
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

-- name: requeue_lost_results
-- After a server crash the UNLOGGED gradients table comes back empty: units marked done
-- whose result is gone are computed again (the running coordinator asks on every
-- reconnect). Storing a result and marking its unit done is one transaction, so a done
-- unit without a result is never one whose result is still on its way.
UPDATE work_units AS u
   SET state = 'pending', worker_id = NULL, lease_until = NULL
 WHERE u.run_id = $1 AND u.step >= $2 AND u.state = 'done'
   AND NOT EXISTS (SELECT 1 FROM gradients AS g WHERE g.unit_id = u.id)
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
       u.step, u.state AS unit_state, u.version AS unit_version, u.replica_of, w.name AS worker_name
  FROM gradients AS g
  JOIN work_units AS u ON u.id = g.unit_id
  LEFT JOIN workers AS w ON w.id = g.worker_id
 WHERE g.run_id = $1
 ORDER BY g.unit_id;

-- name: gradient_payload
SELECT payload FROM gradients WHERE id = $1;

-- name: consume_gradient
-- Folded: the result leaves the table, its unit is used (if something cancelled it
-- meanwhile, it stays cancelled).
WITH gone AS (DELETE FROM gradients WHERE id = $1)
UPDATE work_units SET state = 'used' WHERE id = $2 AND state = 'done';

-- name: reject_gradient
-- The unit goes back to pending (the update trigger wakes the workers), unless it has
-- failed $6 times already: a unit that always yields a bad gradient is given up on, so it
-- cannot keep the whole class busy recomputing it.
WITH gone AS (DELETE FROM gradients WHERE id = $1),
     logged AS (INSERT INTO rejections (run_id, unit_id, worker_id, reason) VALUES ($3, $2, $4, $5)),
     counted AS (UPDATE workers SET refused = refused + 1 WHERE id = $4)
UPDATE work_units
   SET state = CASE WHEN attempts >= $6 THEN 'cancelled' ELSE 'pending' END,
       worker_id = NULL, lease_until = NULL
 WHERE id = $2 AND state = 'done'
RETURNING state;

-- name: insert_replica
-- A copy of a unit whose result is to be checked (the insert trigger wakes the workers;
-- ganns_api.claim keeps it from whoever computed the original).
INSERT INTO work_units (run_id, seq, step, version, epoch, indices, noise_seed, replica_of)
SELECT run_id, seq, step, version, epoch, indices, noise_seed, id FROM work_units WHERE id = $1
RETURNING id;

-- name: logins_online
-- How many logins could check each other's results (a copy goes to another login).
SELECT count(DISTINCT login) FROM workers
 WHERE run_id = $1 AND state <> 'offline' AND quarantined_at IS NULL
   AND last_seen > now() - make_interval(secs => $2);

-- name: delete_replicas
-- On resume the results they were to check are gone (their units are recomputed anyway).
DELETE FROM work_units WHERE run_id = $1 AND replica_of IS NOT NULL;

-- name: quarantine_now
-- A worker whose result disagreed with two others'.
UPDATE workers SET refused = refused + 1, quarantined_at = coalesce(quarantined_at, now()),
       quarantine_reason = coalesce(quarantine_reason, $2)
 WHERE id = $1;

-- name: quarantine_worker
-- A worker whose results keep being refused gets no more units (ganns_api.claim checks).
-- Refusals count per login: a student's new worker rows start no cleaner.
UPDATE workers AS w SET quarantined_at = now(), quarantine_reason = $3
 WHERE w.id = $1 AND w.quarantined_at IS NULL
   AND (SELECT sum(x.refused) FROM workers AS x WHERE x.login = w.login) >= $2
RETURNING w.id;

-- name: drop_gradient
-- Its step already closed: too stale to count.
WITH gone AS (DELETE FROM gradients WHERE id = $1)
UPDATE work_units SET state = 'cancelled' WHERE id = $2 AND state = 'done';

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
  FROM ganns_view.events WHERE run_id = $1 ORDER BY id DESC LIMIT $2;

-- Dashboards read the ganns_view views (sql/003_roles.sql), which any role may read.

-- name: view_run
SELECT * FROM ganns_view.runs WHERE id = $1;

-- name: view_active_run
SELECT * FROM ganns_view.runs WHERE status IN ('running', 'paused') ORDER BY id DESC LIMIT 1;

-- name: view_latest_run
SELECT * FROM ganns_view.runs ORDER BY id DESC LIMIT 1;

-- name: view_weights
SELECT payload FROM ganns_view.weights WHERE run_id = $1 AND version = $2;

-- name: dashboard_workers
-- Workers of a run, plus workers waiting for one; ages computed by the server's clock.
SELECT id, name, device, state, units_done, images_done, quarantined,
       extract(epoch FROM now() - last_seen)::float8 AS last_seen_s,
       extract(epoch FROM last_seen - joined_at)::float8 AS alive_s
  FROM ganns_view.workers
 WHERE run_id = $1 OR (run_id IS NULL AND state <> 'offline')
 ORDER BY images_done DESC, id;

-- name: recent_metrics
SELECT step, g_loss, d_loss, d_x, d_g_z, swd, images,
       extract(epoch FROM created_at)::float8 AS at,
       extract(epoch FROM now() - created_at)::float8 AS age_s
  FROM (SELECT * FROM ganns_view.metrics WHERE run_id = $1 ORDER BY step DESC LIMIT $2) AS recent
 ORDER BY step;

-- name: export_metrics
-- Every metrics row of a run, for `metrics export` (its columns: export.COLUMNS).
SELECT run_id, step, created_at, epoch, images, units, g_loss, d_loss, d_x, d_g_z, swd
  FROM ganns_view.metrics WHERE run_id = $1 ORDER BY step;

-- name: ping
SELECT 1;

-- Workers act only through the ganns_api functions (sql/003_roles.sql): a student's
-- login has no table privileges, and the functions bind every row to session_user.

-- name: api_active_run
SELECT * FROM ganns_api.active_run();

-- name: api_register
SELECT * FROM ganns_api.register($1, $2, $3, $4, $5);

-- name: api_heartbeat
SELECT ganns_api.heartbeat($1, $2, $3);

-- name: api_leave
SELECT * FROM ganns_api.leave($1);

-- name: api_claim
SELECT * FROM ganns_api.claim($1, $2, $3);

-- name: api_extend_lease
SELECT ganns_api.extend_lease($1, $2, $3);

-- name: api_release
SELECT ganns_api.release($1, $2);

-- name: api_weights
SELECT ganns_api.weights($1, $2);

-- name: api_submit
SELECT ganns_api.submit($1, $2, $3, $4);

-- name: api_report_unusable
SELECT ganns_api.report_unusable($1, $2, $3);

-- name: api_rank
SELECT * FROM ganns_api.rank($1);

-- name: pause_run
-- Only a running run is paused: a newer coordinator may have taken over or stopped it.
UPDATE runs SET status = 'paused', updated_at = now() WHERE id = $1 AND status = 'running';

-- name: try_lock_run
-- One coordinator per run: a session-level lock held on a dedicated connection.
SELECT pg_try_advisory_lock(72184555, $1::integer);

-- name: run_lock_holder
-- The session holding run $1's lock (the two-key form: classid, objid, objsubid 2).
SELECT pid FROM pg_locks
 WHERE locktype = 'advisory' AND classid = 72184555 AND objid = $1::integer AND objsubid = 2 AND granted
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- name: end_backend
-- Ends a session of our own role that outlived its client (a cut link).
SELECT pg_terminate_backend($1);

-- name: workers_for_run
SELECT * FROM workers WHERE run_id = $1 ORDER BY id;

-- name: add_login
-- Needs CREATEROLE: see sql/003_roles.sql (ganns_admin.add_login).
SELECT ganns_admin.add_login($1, $2, $3);

-- name: current_database
-- The database a login's URL must name when the admin's URL left it to the environment.
SELECT current_database();

-- ---- class resources (sql/005_resources.sql) -----------------------------------------
-- Workers tell their hardware when they register; dashboards read class-wide totals only.
-- (api_register above is the previous release's call: still served, hardware unknown.)

-- name: api_register_resources
SELECT * FROM ganns_api.register($1, $2, $3, $4, $5, $6, $7, $8, $9);

-- name: view_class_resources
-- Totals over the workers online now (not offline, heard from in the last 30 s).
SELECT workers, reporting, cpu_cores, gpus, gpu_memory_bytes, gpu_models::text AS gpu_models
  FROM ganns_view.class_resources();
