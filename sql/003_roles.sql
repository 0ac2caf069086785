-- ganns-async migration 003: least privilege. Each person gets a login in one of three roles.
--
--   ganns_coordinator  the instructor: runs, weights, units, gradients, events, metrics.
--   ganns_worker       a student: NO table privileges. Everything a worker does goes through
--                      the SECURITY DEFINER functions of schema ganns_api, which bind the
--                      worker row to session_user and enforce the limits below.
--   ganns_viewer       `ganns-async watch`: read-only views in schema ganns_view, without
--                      host names or hardware details. Coordinators and workers are viewers too.
--
-- A login:  CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE ganns_worker;
-- or, with the per-login limits as well (connection limit, statement timeouts):
--           SELECT ganns_admin.add_login('alice', 'password', 'worker');
-- or:       ganns-async db add-student alice --db ADMIN_URL   (prints alice's URL)
--
-- Roles belong to the whole server, not to one database: the roles are created when missing
-- (this needs CREATEROLE, or a superuser), the grants are this database's. Apply it as the
-- owner of the tables (whoever applied 001). See SECURITY.md for the threat model.
--
-- Limits the API enforces for workers that are not coordinators:
--   lease at most 120 s (chosen by the server; a client's wish is clamped to 10..120 s);
--   at most 2 units held at once per login, and 8 workers online per login;
--   a submitted blob no larger than the run's max_payload (set from the model by the
--   coordinator); n_samples between 0 and the unit's image count;
--   a worker never gets a unit it (or, for a student, its login) already failed or reported;
--   a quarantined worker gets no units.

BEGIN;

-- --- roles (server-wide; created once) ------------------------------------------------
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['ganns_viewer', 'ganns_worker', 'ganns_coordinator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object THEN NULL;  -- another database's migration made it just now
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'creating role % needs CREATEROLE: ask the server''s admin to run CREATE ROLE % NOLOGIN and GRANT % TO the user applying this migration WITH ADMIN OPTION, then apply it again', r, r, r;
            END;
        END IF;
    END LOOP;
END
$$;
-- Workers and coordinators are viewers too (granted once: a second grant by another user
-- would need ADMIN OPTION on ganns_viewer since PostgreSQL 16).
DO $$
BEGIN
    IF NOT pg_has_role('ganns_worker', 'ganns_viewer', 'MEMBER') THEN
        GRANT ganns_viewer TO ganns_worker;
    END IF;
    IF NOT pg_has_role('ganns_coordinator', 'ganns_viewer', 'MEMBER') THEN
        GRANT ganns_viewer TO ganns_coordinator;
    END IF;
END
$$;

-- Since PostgreSQL 15 only the database owner may create objects in schema public; older
-- servers (and clusters upgraded from them) let every login do it, and a function there
-- could be picked over a built-in by a query that runs with more rights than its author.
-- The API below never looks in public (search_path = pg_catalog, pg_temp), but the
-- coordinator's queries do: refuse to go on unless students cannot create there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    IF has_schema_privilege('ganns_worker', 'public', 'CREATE')
       OR has_schema_privilege('ganns_viewer', 'public', 'CREATE') THEN
        RAISE EXCEPTION 'every login may create objects in schema public: as its owner, run REVOKE CREATE ON SCHEMA public FROM PUBLIC, then apply this migration again';
    END IF;
END
$$;

-- --- what the roles need from the tables ---------------------------------------------
ALTER TABLE workers
    ADD COLUMN login text NOT NULL DEFAULT session_user,
    ADD COLUMN refused integer NOT NULL DEFAULT 0,         -- results refused or units reported
    ADD COLUMN quarantined_at timestamptz,
    ADD COLUMN quarantine_reason text;
-- Names reach the instructor's terminal: short, and no control, format or bidi characters.
-- NOT VALID: rows written before this migration are left as they were.
ALTER TABLE workers ADD CONSTRAINT workers_name_printable CHECK (
    char_length(name) BETWEEN 1 AND 120
    AND name !~ '[\u0001-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]'
) NOT VALID;
CREATE INDEX workers_login_idx ON workers (login);
CREATE INDEX rejections_unit_idx ON rejections (unit_id);

-- Replication (BOINC): a copy of a unit, computed by another login, checks a result before
-- it counts. A replica shares its original's place in the schedule.
ALTER TABLE work_units ADD COLUMN replica_of bigint REFERENCES work_units (id) ON DELETE CASCADE;
ALTER TABLE work_units DROP CONSTRAINT work_units_run_id_seq_key;
CREATE UNIQUE INDEX work_units_run_seq_idx ON work_units (run_id, seq) WHERE replica_of IS NULL;
CREATE INDEX work_units_replica_idx ON work_units (replica_of) WHERE replica_of IS NOT NULL;

-- The largest blob a worker may store for this run (the coordinator sets it from the model),
-- and the longest a worker may hold a unit, lease renewals included (its --step-timeout).
ALTER TABLE runs ADD COLUMN max_payload integer NOT NULL DEFAULT 134217728 CHECK (max_payload > 0);
ALTER TABLE runs ADD COLUMN max_unit_s double precision NOT NULL DEFAULT 600 CHECK (max_unit_s > 0);

GRANT SELECT ON ganns_migrations TO ganns_viewer;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON runs, weights, workers, work_units, gradients, rejections, events, metrics
    TO ganns_coordinator;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO ganns_coordinator;
-- The coordinator vacuums the blob tables after each step (002); PostgreSQL 17 can grant
-- that. Before 17 only the owner can, and the autovacuum settings of 002 take over.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 170000 THEN
        EXECUTE 'GRANT MAINTAIN ON weights, gradients, work_units TO ganns_coordinator';
    END IF;
END
$$;

-- --- ganns_view: what a dashboard may read -------------------------------------------
CREATE SCHEMA ganns_view;
CREATE VIEW ganns_view.runs AS
    SELECT id, created_at, updated_at, status, config, dataset_fingerprint, dataset_size,
           step, next_seq, images_seen
      FROM public.runs;
CREATE VIEW ganns_view.workers AS
    SELECT id, name, device, run_id, joined_at, last_seen, state, units_done, images_done,
           quarantined_at IS NOT NULL AS quarantined
      FROM public.workers;
CREATE VIEW ganns_view.metrics AS
    SELECT run_id, step, created_at, epoch, images, units, g_loss, d_loss, d_x, d_g_z, swd
      FROM public.metrics;
CREATE VIEW ganns_view.events AS
    SELECT id, run_id, created_at, kind, message FROM public.events;
-- Published weights are the class's to look at (and what the Hub gets); Adam state is not.
CREATE VIEW ganns_view.weights AS
    SELECT run_id, version, created_at, payload FROM public.weights;
GRANT USAGE ON SCHEMA ganns_view TO ganns_viewer;
GRANT SELECT ON ALL TABLES IN SCHEMA ganns_view TO ganns_viewer;

-- --- ganns_api: everything a worker may do -------------------------------------------
-- Every function runs as this file's owner with a fixed search_path (pg_temp last, so a
-- caller's temporary objects cannot shadow ours), and takes the caller's identity from
-- session_user, which SET ROLE cannot change.
CREATE SCHEMA ganns_api;

-- A coordinator member (or superuser) is trusted: the instructor's own machines.
CREATE FUNCTION ganns_api._trusted() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(session_user, 'ganns_coordinator', 'USAGE');
$$;

-- Text a client sent, without control/format/bidi characters, trimmed, at most n characters.
CREATE FUNCTION ganns_api._clean(value text, n integer) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT left(btrim(regexp_replace(coalesce(value, ''),
        '[\u0001-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]',
        '', 'g')), n);
$$;

-- The caller's own worker row; anyone else's is refused.
CREATE FUNCTION ganns_api._own_worker(p_worker bigint) RETURNS public.workers
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers;
BEGIN
    SELECT * INTO w FROM public.workers WHERE id = p_worker AND login = session_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'worker % does not belong to login %', p_worker, session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN w;
END
$$;

CREATE FUNCTION ganns_api.active_run() RETURNS SETOF ganns_view.runs
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM ganns_view.runs WHERE status IN ('running', 'paused') ORDER BY id DESC LIMIT 1;
$$;

-- A new worker row for the caller. A student's worker is named after the login, plus the
-- label it asked for ("alice/laptop"): names on the leaderboard cannot be forged.
CREATE FUNCTION ganns_api.register(p_label text, p_hostname text, p_device text, p_cpu text, p_gpu text,
                                   OUT worker_id bigint, OUT worker_name text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_login text := session_user;
    v_label text := ganns_api._clean(p_label, 40);
    v_name text;
BEGIN
    IF ganns_api._trusted() THEN
        v_name := coalesce(nullif(v_label, ''), v_login);
    ELSE
        v_name := CASE WHEN v_label IN ('', v_login) THEN v_login ELSE v_login || '/' || v_label END;
        IF (SELECT count(*) FROM public.workers
             WHERE login = v_login AND state <> 'offline' AND last_seen > now() - interval '2 minutes') >= 8 THEN
            RAISE EXCEPTION 'login % has 8 workers online already', v_login
                USING ERRCODE = 'program_limit_exceeded';
        END IF;
        IF (SELECT count(*) FROM public.workers WHERE login = v_login AND joined_at > now() - interval '1 minute') >= 20 THEN
            RAISE EXCEPTION 'login % registered 20 workers in the last minute; wait a minute', v_login
                USING ERRCODE = 'program_limit_exceeded';
        END IF;
    END IF;
    INSERT INTO public.workers (name, hostname, device, cpu_info, gpu_info, login)
    VALUES (ganns_api._clean(v_name, 120), ganns_api._clean(p_hostname, 255), ganns_api._clean(p_device, 64),
            nullif(ganns_api._clean(p_cpu, 200), ''), nullif(ganns_api._clean(p_gpu, 200), ''), v_login)
    RETURNING id, name INTO worker_id, worker_name;
END
$$;

-- "I am alive, in this state, on this run." Joining a run logs the join event (written
-- here, from the bound name, so no client writes to the event log). Returns why the worker
-- is quarantined, or NULL.
CREATE FUNCTION ganns_api.heartbeat(p_worker bigint, p_state text, p_run bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
BEGIN
    IF p_state IS NULL OR p_state NOT IN ('idle', 'computing', 'uploading') THEN
        RAISE EXCEPTION 'worker state must be idle, computing or uploading' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_run IS NOT NULL AND NOT EXISTS (SELECT 1 FROM public.runs WHERE id = p_run) THEN
        RAISE EXCEPTION 'no run %', p_run USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A row that went offline or quiet may come back only within the login's 8 online.
    IF (w.state = 'offline' OR w.last_seen < now() - interval '2 minutes') AND NOT ganns_api._trusted()
       AND (SELECT count(*) FROM public.workers
             WHERE login = w.login AND id <> w.id AND state <> 'offline'
               AND last_seen > now() - interval '2 minutes') >= 8 THEN
        RAISE EXCEPTION 'login % has 8 workers online already', w.login USING ERRCODE = 'program_limit_exceeded';
    END IF;
    -- The run only moves forward (to a newer run): the join is logged once per run.
    UPDATE public.workers SET last_seen = now(), state = p_state, run_id = coalesce(p_run, run_id)
     WHERE id = p_worker;
    IF p_run IS NOT NULL AND (w.run_id IS NULL OR p_run > w.run_id) THEN
        INSERT INTO public.events (run_id, kind, message)
        VALUES (p_run, 'join', w.name || ' joined on ' || w.device);
    END IF;
    RETURN CASE WHEN w.quarantined_at IS NOT NULL THEN coalesce(w.quarantine_reason, 'quarantined') END;
END
$$;

-- Leaving: whatever the worker holds goes back at once, and the log says goodbye.
CREATE FUNCTION ganns_api.leave(p_worker bigint) RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
BEGIN
    RETURN QUERY
        UPDATE public.work_units SET state = 'pending', worker_id = NULL, lease_until = NULL
         WHERE worker_id = p_worker AND state = 'claimed'
        RETURNING id;
    UPDATE public.workers SET last_seen = now(), state = 'offline' WHERE id = p_worker;
    IF w.run_id IS NOT NULL AND w.state <> 'offline' THEN
        INSERT INTO public.events (run_id, kind, message)
        VALUES (w.run_id, 'leave', w.name || ' left after ' || w.units_done || ' unit(s)');
    END IF;
END
$$;

-- A pending unit of a running run, leased to the caller for a server-chosen time.
CREATE FUNCTION ganns_api.claim(p_worker bigint, p_run bigint, p_lease_s double precision)
RETURNS TABLE (id bigint, run_id bigint, seq bigint, step integer, version integer, epoch integer,
               indices integer[], noise_seed bigint, weights_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
    v_trusted boolean := ganns_api._trusted();
    v_lease double precision := least(greatest(coalesce(p_lease_s, 60), 10), 120);
BEGIN
    -- A student's quarantine holds for all of the login's workers, old and new.
    IF w.quarantined_at IS NOT NULL
       OR (NOT v_trusted AND EXISTS (SELECT 1 FROM public.workers AS x
                                      WHERE x.login = w.login AND x.quarantined_at IS NOT NULL))
       OR NOT EXISTS (SELECT 1 FROM public.runs AS r WHERE r.id = p_run AND r.status = 'running') THEN
        RETURN;
    END IF;
    IF NOT v_trusted THEN
        -- Row locks on the login's workers serialize its claims (a student cannot take them,
        -- unlike an advisory lock), so two at once cannot both pass the count.
        PERFORM 1 FROM public.workers AS x WHERE x.login = w.login ORDER BY x.id FOR UPDATE;
        IF (SELECT count(*) FROM public.work_units AS u JOIN public.workers AS x ON x.id = u.worker_id
             WHERE x.login = w.login AND u.state = 'claimed') >= 2 THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY
    UPDATE public.work_units AS u
       SET state = 'claimed', worker_id = p_worker, lease_until = now() + make_interval(secs => v_lease),
           claimed_at = now(), attempts = u.attempts + 1
     WHERE u.id = (SELECT c.id FROM public.work_units AS c
                    WHERE c.run_id = p_run AND c.state = 'pending'
                      -- A unit whose result this worker (a student: this login) had refused,
                      -- or that it reported unusable, is recomputed by someone else.
                      AND NOT EXISTS (SELECT 1 FROM public.rejections AS j
                                        JOIN public.workers AS x ON x.id = j.worker_id
                                       WHERE j.unit_id = c.id
                                         AND (x.id = p_worker OR (NOT v_trusted AND x.login = w.login)))
                      -- A replica checks a result: never computed by whoever computed that
                      -- result or another copy of it.
                      AND (c.replica_of IS NULL OR NOT EXISTS (
                              SELECT 1 FROM public.work_units AS o
                                JOIN public.workers AS x ON x.id = o.worker_id
                               WHERE (o.id = c.replica_of OR o.replica_of = c.replica_of) AND o.id <> c.id
                                 AND (x.id = p_worker OR (NOT v_trusted AND x.login = w.login))))
                    -- Open steps first; within a step, copies (they hold a result back) first.
                    ORDER BY c.step, c.replica_of IS NULL, c.id
                    LIMIT 1
                    FOR UPDATE SKIP LOCKED)
       AND u.state = 'pending'
    RETURNING u.id, u.run_id, u.seq, u.step, u.version, u.epoch, u.indices, u.noise_seed,
              -- which publication of the version: a rewound run publishes it again, maybe different
              (SELECT v.created_at FROM public.weights AS v
                WHERE v.run_id = u.run_id AND v.version = u.version);
END
$$;

CREATE FUNCTION ganns_api.extend_lease(p_worker bigint, p_unit bigint, p_lease_s double precision)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM ganns_api._own_worker(p_worker);
    -- No unit is held longer than the run's max_unit_s, however often its lease is renewed:
    -- a student cannot sit on the units a round waits for.
    UPDATE public.work_units AS u
       SET lease_until = least(now() + make_interval(secs => least(greatest(coalesce(p_lease_s, 60), 10), 120)),
                               u.claimed_at + make_interval(secs => r.max_unit_s))
      FROM public.runs AS r
     WHERE u.id = p_unit AND u.worker_id = p_worker AND u.state = 'claimed' AND r.id = u.run_id
       AND u.claimed_at + make_interval(secs => r.max_unit_s) > now();
    RETURN FOUND;
END
$$;

CREATE FUNCTION ganns_api.release(p_worker bigint, p_unit bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM ganns_api._own_worker(p_worker);
    UPDATE public.work_units SET state = 'pending', worker_id = NULL, lease_until = NULL
     WHERE id = p_unit AND worker_id = p_worker AND state = 'claimed';
    RETURN FOUND;
END
$$;

CREATE FUNCTION ganns_api.weights(p_run bigint, p_version integer) RETURNS bytea
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT payload FROM public.weights WHERE run_id = p_run AND version = p_version;
$$;

-- Store a result for a unit the caller holds. Returns 'stored'; 'lost' when the lease is
-- gone (someone else has the unit); or 'refused: why' when the result breaks a limit (the
-- unit goes back to pending for another worker, and the refusal counts against this one).
CREATE FUNCTION ganns_api.submit(p_worker bigint, p_unit bigint, p_n_samples integer, p_payload bytea)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
    u public.work_units;
    v_cap integer;
    v_why text;
BEGIN
    SELECT * INTO u FROM public.work_units AS x
     WHERE x.id = p_unit AND x.worker_id = p_worker AND x.state = 'claimed'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    SELECT max_payload INTO v_cap FROM public.runs WHERE id = u.run_id;
    IF p_payload IS NULL OR octet_length(p_payload) > v_cap THEN
        v_why := format('payload of %s bytes is over the run''s cap of %s', coalesce(octet_length(p_payload), 0), v_cap);
    ELSIF p_n_samples IS NULL OR p_n_samples < 0 OR p_n_samples > cardinality(u.indices) THEN
        v_why := format('%s samples in a unit of %s images', p_n_samples, cardinality(u.indices));
    END IF;
    IF v_why IS NOT NULL THEN
        PERFORM ganns_api._refuse(w, u, v_why);
        RETURN 'refused: ' || v_why;
    END IF;
    UPDATE public.work_units SET state = 'done', done_at = now(), lease_until = NULL WHERE id = p_unit;
    INSERT INTO public.gradients (unit_id, run_id, worker_id, version, n_samples, payload)
    VALUES (p_unit, u.run_id, p_worker, u.version, p_n_samples, p_payload);
    UPDATE public.workers
       SET units_done = units_done + 1, images_done = images_done + p_n_samples, last_seen = now()
     WHERE id = p_worker;
    RETURN 'stored';
END
$$;

-- A unit the worker cannot compute (indices outside its dataset, say). It goes to another
-- login (the report counts against this one), and is cancelled only on the word of a
-- trusted worker: students cannot cancel units, even together. A unit nobody can compute
-- waits for its step's deadline.
CREATE FUNCTION ganns_api.report_unusable(p_worker bigint, p_unit bigint, p_reason text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
    u public.work_units;
BEGIN
    SELECT * INTO u FROM public.work_units AS x
     WHERE x.id = p_unit AND x.worker_id = p_worker AND x.state = 'claimed'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    RETURN ganns_api._refuse(w, u, 'unusable: ' || ganns_api._clean(p_reason, 200));
END
$$;

-- Internal: log why a unit came back, count it against the worker, and requeue the unit,
-- or cancel it when a trusted worker reported it unusable.
CREATE FUNCTION ganns_api._refuse(w public.workers, u public.work_units, p_reason text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_state text := 'pending';
BEGIN
    INSERT INTO public.rejections (run_id, unit_id, worker_id, reason) VALUES (u.run_id, u.id, w.id, p_reason);
    -- Three refusals among a login's workers and the worker is quarantined (the coordinator
    -- applies the same rule, QUARANTINE_AFTER in intake.py, to results it refuses).
    UPDATE public.workers SET refused = refused + 1 WHERE id = w.id;
    UPDATE public.workers
       SET quarantined_at = now(), quarantine_reason = '3 units refused or reported'
     WHERE id = w.id AND quarantined_at IS NULL
       AND (SELECT sum(x.refused) FROM public.workers AS x WHERE x.login = w.login) >= 3;
    IF p_reason LIKE 'unusable: %' AND ganns_api._trusted() THEN
        v_state := 'cancelled';
    END IF;
    UPDATE public.work_units SET state = v_state, worker_id = NULL, lease_until = NULL WHERE id = u.id;
    INSERT INTO public.events (run_id, kind, message)
    VALUES (u.run_id, 'rejected', format('unit %s from %s came back: %s%s', u.id, w.name, p_reason,
                                         CASE WHEN v_state = 'cancelled' THEN ' (cancelled)' ELSE '' END));
    -- Wake the coordinator: a cancelled unit changes what its round waits for.
    PERFORM pg_notify('ganns_gradients', u.run_id::text || ':0');
    RETURN v_state;
END
$$;

-- Where the worker stands among the run's workers, by images contributed.
CREATE FUNCTION ganns_api.rank(p_worker bigint, OUT rank bigint, OUT total bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
BEGIN
    SELECT count(*) + 1 INTO rank FROM public.workers WHERE run_id = w.run_id AND images_done > w.images_done;
    SELECT count(*) INTO total FROM public.workers WHERE run_id = w.run_id AND state <> 'offline';
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ganns_api FROM PUBLIC;
GRANT USAGE ON SCHEMA ganns_api TO ganns_worker, ganns_coordinator;
GRANT EXECUTE ON FUNCTION
    ganns_api.active_run(), ganns_api.register(text, text, text, text, text),
    ganns_api.heartbeat(bigint, text, bigint), ganns_api.leave(bigint),
    ganns_api.claim(bigint, bigint, double precision),
    ganns_api.extend_lease(bigint, bigint, double precision), ganns_api.release(bigint, bigint),
    ganns_api.weights(bigint, integer), ganns_api.submit(bigint, bigint, integer, bytea),
    ganns_api.report_unusable(bigint, bigint, text), ganns_api.rank(bigint)
    TO ganns_worker, ganns_coordinator;

-- --- ganns_admin: making logins (for whoever holds CREATEROLE) ------------------------
CREATE SCHEMA ganns_admin;
REVOKE ALL ON SCHEMA ganns_admin FROM PUBLIC;

-- A login in one of the three roles. Students and viewers also get a connection limit and
-- timeouts, so one login cannot hold the server's connections or run queries for hours.
-- Runs with the caller's rights: creating roles needs CREATEROLE.
CREATE FUNCTION ganns_admin.add_login(p_name text, p_password text, p_kind text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_role text := CASE p_kind WHEN 'worker' THEN 'ganns_worker' WHEN 'coordinator' THEN 'ganns_coordinator'
                               WHEN 'viewer' THEN 'ganns_viewer' END;
BEGIN
    IF v_role IS NULL THEN
        RAISE EXCEPTION 'kind must be worker, coordinator or viewer' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_name IS NULL OR p_name !~ '^[a-z_][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'login names are 1 to 40 characters of a-z, 0-9 and _, starting with a letter or _'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_name IN ('ganns_worker', 'ganns_coordinator', 'ganns_viewer') THEN
        RAISE EXCEPTION '% is a group role, not a login', p_name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('CREATE ROLE %I LOGIN IN ROLE %I', p_name, v_role);
    IF p_password IS NOT NULL THEN
        EXECUTE format('ALTER ROLE %I PASSWORD %L', p_name, p_password);
    END IF;
    IF p_kind <> 'coordinator' THEN
        -- Two connections per worker process: four machines per student.
        EXECUTE format('ALTER ROLE %I CONNECTION LIMIT 8', p_name);
        EXECUTE format('ALTER ROLE %I SET statement_timeout = %L', p_name, '120s');
        EXECUTE format('ALTER ROLE %I SET idle_in_transaction_session_timeout = %L', p_name, '60s');
    END IF;
END
$$;
REVOKE ALL ON FUNCTION ganns_admin.add_login(text, text, text) FROM PUBLIC;

INSERT INTO ganns_migrations (name) VALUES ('003_roles');

COMMIT;
