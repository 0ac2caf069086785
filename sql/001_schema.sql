-- ganns-async schema, migration 001. PostgreSQL 13 or newer.
--
-- Apply with psql:   psql -v ON_ERROR_STOP=1 -f sql/001_schema.sql "$DATABASE_URL"
-- or with the CLI:   ganns-async db migrate --db "$DATABASE_URL"
-- Both record the migration in ganns_migrations; coordinator and workers accept either.
--
-- Notifications (payloads carry ids only, never data):
--   ganns_units      '<run_id>'            work units became pending (one per statement)
--   ganns_gradients  '<run_id>:<grad_id>'  a worker stored a gradient
--   ganns_control    '<run_id>:<status>'   a run was created, paused, resumed, stopped or finished
--   ganns_weights    '<run_id>:<version>'  a run published a new weights version
--   ganns_workers    '<worker_id>'         a worker joined, changed state or left
--   ganns_events     '<run_id>'            a line was added to the event log

BEGIN;

CREATE TABLE ganns_migrations (
    name        text PRIMARY KEY,
    -- sha256 of the file; NULL when psql applied it (`ganns-async db migrate` fills it in).
    checksum    text,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One training job. `step` is the number of optimizer steps taken, which is also
-- the newest published weights version; it is the truth a resuming coordinator trusts.
CREATE TABLE runs (
    id                  bigserial PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    status              text NOT NULL DEFAULT 'running'
                        CHECK (status IN ('running', 'paused', 'stopped', 'done')),
    config              jsonb NOT NULL,
    dataset_fingerprint text NOT NULL,
    dataset_size        integer NOT NULL CHECK (dataset_size > 0),
    step                integer NOT NULL DEFAULT 0 CHECK (step >= 0),
    next_seq            bigint NOT NULL DEFAULT 0,     -- next position in the unit schedule
    images_seen         bigint NOT NULL DEFAULT 0
);

-- Published model versions: G and D parameters plus BatchNorm buffers (codec blob, fp32),
-- and the Adam state that produced them (kept for the newest version only, for --resume).
CREATE TABLE weights (
    run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    version     integer NOT NULL CHECK (version >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    payload     bytea NOT NULL,
    optimizer   bytea,
    PRIMARY KEY (run_id, version)
);
-- Blobs are zstd already: skip PostgreSQL's own compression attempt (about 2x faster I/O).
ALTER TABLE weights ALTER COLUMN payload SET STORAGE EXTERNAL;
ALTER TABLE weights ALTER COLUMN optimizer SET STORAGE EXTERNAL;

CREATE TABLE workers (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    hostname     text NOT NULL,
    device       text NOT NULL,
    cpu_info     text,
    gpu_info     text,
    run_id       bigint REFERENCES runs (id) ON DELETE SET NULL,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    state        text NOT NULL DEFAULT 'idle'
                 CHECK (state IN ('idle', 'computing', 'uploading', 'offline')),
    units_done   integer NOT NULL DEFAULT 0,
    images_done  bigint NOT NULL DEFAULT 0
);

-- A work unit: which images and which noise, computed on which weights version.
-- Its result depends on the unit alone, so any worker can (re)compute it.
CREATE TABLE work_units (
    id           bigserial PRIMARY KEY,
    run_id       bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,          -- position in the run's unit schedule
    step         integer NOT NULL,         -- the optimizer step it feeds
    version      integer NOT NULL,         -- the weights version to compute on
    epoch        integer NOT NULL,
    indices      integer[] NOT NULL,
    noise_seed   bigint NOT NULL,
    -- pending -> claimed -> done (gradient stored) -> used (aggregated); cancelled when its
    -- step closed without it.
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'claimed', 'done', 'used', 'cancelled')),
    worker_id    bigint REFERENCES workers (id) ON DELETE SET NULL,
    lease_until  timestamptz,
    attempts     integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    claimed_at   timestamptz,
    done_at      timestamptz,
    UNIQUE (run_id, seq)
);
CREATE INDEX work_units_pending_idx ON work_units (run_id, id) WHERE state = 'pending';
CREATE INDEX work_units_claimed_idx ON work_units (lease_until) WHERE state = 'claimed';
CREATE INDEX work_units_step_idx ON work_units (run_id, step);

-- Gradients are ephemeral and recomputable: UNLOGGED skips tens of MB of WAL per unit.
-- After a server crash the table is empty; the coordinator re-queues units whose
-- gradient is gone (see queries.sql: requeue_lost_units).
CREATE UNLOGGED TABLE gradients (
    id          bigserial PRIMARY KEY,
    unit_id     bigint NOT NULL UNIQUE REFERENCES work_units (id) ON DELETE CASCADE,
    run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    worker_id   bigint REFERENCES workers (id) ON DELETE SET NULL,
    version     integer NOT NULL,
    n_samples   integer NOT NULL CHECK (n_samples >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    payload     bytea NOT NULL
);
ALTER TABLE gradients ALTER COLUMN payload SET STORAGE EXTERNAL;

-- Gradients the coordinator refused, and why (their units went back to pending).
CREATE TABLE rejections (
    id          bigserial PRIMARY KEY,
    run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    unit_id     bigint,
    worker_id   bigint REFERENCES workers (id) ON DELETE SET NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A human-readable event log for dashboards: joins, leaves, requeued leases, rejections.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    run_id      bigint REFERENCES runs (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL,
    message     text NOT NULL
);
CREATE INDEX events_run_idx ON events (run_id, id);

-- One row per optimizer step: the training curve.
CREATE TABLE metrics (
    run_id       bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step         integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    epoch        integer NOT NULL,
    images       integer NOT NULL,
    units        integer NOT NULL,
    g_loss       double precision,
    d_loss       double precision,
    d_x          double precision,
    d_g_z        double precision,
    swd          double precision,
    PRIMARY KEY (run_id, step)
);

-- Notify once per statement when units become pending (inserted, or returned by an
-- expired lease), so a psql INSERT wakes the workers exactly like the coordinator's.
CREATE FUNCTION ganns_notify_units_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ganns_units', r.run_id::text)
    FROM (SELECT DISTINCT run_id FROM new_units WHERE state = 'pending') AS r;
    RETURN NULL;
END;
$$;

CREATE FUNCTION ganns_notify_units_requeued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ganns_units', r.run_id::text)
    FROM (SELECT DISTINCT n.run_id
            FROM new_units AS n JOIN old_units AS o ON o.id = n.id
           WHERE n.state = 'pending' AND o.state <> 'pending') AS r;
    RETURN NULL;
END;
$$;

CREATE TRIGGER work_units_inserted AFTER INSERT ON work_units
    REFERENCING NEW TABLE AS new_units
    FOR EACH STATEMENT EXECUTE FUNCTION ganns_notify_units_inserted();

CREATE TRIGGER work_units_requeued AFTER UPDATE ON work_units
    REFERENCING OLD TABLE AS old_units NEW TABLE AS new_units
    FOR EACH STATEMENT EXECUTE FUNCTION ganns_notify_units_requeued();

CREATE FUNCTION ganns_notify_gradient() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ganns_gradients', NEW.run_id::text || ':' || NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER gradients_inserted AFTER INSERT ON gradients
    FOR EACH ROW EXECUTE FUNCTION ganns_notify_gradient();

-- Run status and version changes. The heavy weights row is written in its own
-- transaction first; this light one (runs.step) announces it, so the NOTIFY commit
-- lock is never held while tens of MB are flushed.
CREATE FUNCTION ganns_notify_run() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify('ganns_control', NEW.id::text || ':' || NEW.status);
    END IF;
    IF TG_OP = 'INSERT' OR NEW.step IS DISTINCT FROM OLD.step THEN
        PERFORM pg_notify('ganns_weights', NEW.id::text || ':' || NEW.step::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_changed AFTER INSERT OR UPDATE ON runs
    FOR EACH ROW EXECUTE FUNCTION ganns_notify_run();

CREATE FUNCTION ganns_notify_worker() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
        PERFORM pg_notify('ganns_workers', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER workers_changed AFTER INSERT OR UPDATE ON workers
    FOR EACH ROW EXECUTE FUNCTION ganns_notify_worker();

CREATE FUNCTION ganns_notify_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ganns_events', coalesce(NEW.run_id::text, ''));
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_inserted AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION ganns_notify_event();

INSERT INTO ganns_migrations (name) VALUES ('001_schema');

COMMIT;
