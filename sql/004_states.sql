-- ganns-async migration 004: one explicit state machine for work units, one vocabulary for
-- workers. The same table lives in Python (ganns_async/states.py); the tests try every
-- change of state against this trigger.
--
-- A work unit's life:
--
--        +------- release, lease expired, reported unusable ---+
--        v                                                     |
--     pending ------------------ claim -------------------> claimed
--      ^   ^                                                    |
--      |   |                                                  submit
--      |   |                                                    v
--      |   +------- refused, or its result lost ------------- done
--      |                                                        |
--      |                                                      fold
--      |                                                        v
--      +------------ its sum lost with the coordinator ------- used
--
--     pending, claimed, done ---- step closed, stale, given up ----> cancelled (final)
--
-- "Its result lost": the gradients table is UNLOGGED, so a server crash empties it; units
-- marked done whose result is gone are computed again. "Its sum lost": units folded into the
-- sum of a step that was open when the coordinator died are computed again by --resume.
-- Deleting a unit (a rewind, pruning finished steps) is not a change of state.

BEGIN;

CREATE FUNCTION ganns_unit_state_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF (OLD.state, NEW.state) NOT IN (
        ('pending', 'claimed'), ('pending', 'cancelled'),
        ('claimed', 'pending'), ('claimed', 'done'), ('claimed', 'cancelled'),
        ('done', 'used'), ('done', 'pending'), ('done', 'cancelled'),
        ('used', 'pending')) THEN
        RAISE EXCEPTION 'work unit % cannot go from % to %', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation',
                  HINT = 'the legal changes are in the comment on work_units.state';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER work_units_state_guard BEFORE UPDATE OF state ON work_units
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION ganns_unit_state_guard();

COMMENT ON COLUMN work_units.state IS
'A work unit''s life (the trigger work_units_state_guard refuses any other change):

       +------- release, lease expired, reported unusable ---+
       v                                                     |
    pending ------------------ claim -------------------> claimed
     ^   ^                                                    |
     |   |                                                  submit
     |   |                                                    v
     |   +------- refused, or its result lost ------------- done
     |                                                        |
     |                                                      fold
     |                                                        v
     +------------ its sum lost with the coordinator ------- used

    pending, claimed, done ---- step closed, stale, given up ----> cancelled (final)';

-- Workers: the database stores the words the worker and the dashboards use.
ALTER TABLE workers DROP CONSTRAINT IF EXISTS workers_state_check;
ALTER TABLE workers ADD CONSTRAINT workers_state_check
    CHECK (state IN ('waiting', 'idle', 'computing', 'uploading', 'paused', 'offline'));
COMMENT ON COLUMN workers.state IS
'waiting (no active run), idle, computing, uploading, paused (the run is), offline (left; set by ganns_api.leave only)';

-- The heartbeat of migration 003, taking the whole vocabulary (offline only by leaving).
CREATE OR REPLACE FUNCTION ganns_api.heartbeat(p_worker bigint, p_state text, p_run bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w public.workers := ganns_api._own_worker(p_worker);
BEGIN
    IF p_state IS NULL OR p_state NOT IN ('waiting', 'idle', 'computing', 'uploading', 'paused') THEN
        RAISE EXCEPTION 'worker state must be waiting, idle, computing, uploading or paused'
            USING ERRCODE = 'invalid_parameter_value';
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

INSERT INTO ganns_migrations (name) VALUES ('004_states');

COMMIT;
