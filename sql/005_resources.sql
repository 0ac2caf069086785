-- ganns-async migration 005: what the class brings, in numbers the projector can add up.
--
-- Until now a worker registered its hardware as free text (cpu_info, gpu_info: for the
-- instructor's eyes only). This adds four facts per worker, filled in when it registers:
--
--   cpu_cores         the CPU threads its PyTorch computes with (torch.get_num_threads():
--                     --threads when given, else PyTorch's default for the machine). Not
--                     os.cpu_count(), which counts every logical CPU of the host: hyperthreads
--                     twice, and all 96 cores of a server whose container (Colab, a lab VM)
--                     may use 2, whatever --threads says. Counted for GPU workers too: their
--                     CPU decodes the images and drives the GPU.
--   gpu_count         0 or 1: a worker trains on ONE device (--device), and that device is
--                     what it brings; a machine with four GPUs and one worker on cuda:0
--                     brings one. CUDA and Apple's MPS count as GPUs.
--   gpu_memory_bytes  the memory of that device (for MPS, the share of unified memory Metal
--                     recommends for one process); NULL without a GPU or when unknown.
--   gpu_name          its model, as the driver names it ("NVIDIA GeForce RTX 3060").
--
-- Workers are not trusted (SECURITY.md): a student can call ganns_api.register from psql with
-- any numbers. The server does not believe a value outside its range: it is stored as NULL
-- (unknown) and adds nothing to the totals, and the registration goes on, so an honest
-- worker with a freak reading still trains. Ranges (also CHECKs, which bind the instructor's
-- psql too): 1..1024 cores, 0..1 GPU, 1 byte..1 TiB of GPU memory, a GPU name of 1..64
-- characters from [A-Za-z0-9 ._()/+-] (no escapes, no emoji, nothing wide). Memory and name
-- only with gpu_count = 1. A value that is not even a bigint (1e30) fails the call.
-- Per login the totals stay bounded: at most 8 of its workers count as online (003).
--
-- Registration: ganns_api.register takes the four facts as four more arguments. The
-- five-argument register of 003 (the previous release's call) stays and registers with the
-- facts unknown.
--
-- Viewers still see no worker's host or hardware: ganns_view.class_resources() returns only
-- totals over the workers online now (see that function), for `watch` and the coordinator's
-- dashboard.
--
-- Apply with psql (-v ON_ERROR_STOP=1 -f) or `ganns-async db migrate`, like the others: the
-- file is one transaction, and applying it twice fails on its first statement and changes
-- nothing (`db migrate` skips it once ganns_migrations records it).

BEGIN;

ALTER TABLE workers
    ADD COLUMN cpu_cores integer,
    ADD COLUMN gpu_count integer,
    ADD COLUMN gpu_memory_bytes bigint,
    ADD COLUMN gpu_name text;
-- Rows from before this migration have NULL everywhere: nothing to validate.
ALTER TABLE workers
    ADD CONSTRAINT workers_cpu_cores_sane CHECK (cpu_cores BETWEEN 1 AND 1024),
    ADD CONSTRAINT workers_gpu_count_sane CHECK (gpu_count BETWEEN 0 AND 1),
    ADD CONSTRAINT workers_gpu_memory_sane CHECK (gpu_memory_bytes BETWEEN 1 AND 1099511627776),
    ADD CONSTRAINT workers_gpu_name_sane CHECK (gpu_name ~ '^[A-Za-z0-9 ._()/+-]{1,64}$'),
    ADD CONSTRAINT workers_gpu_facts_need_a_gpu CHECK (
        gpu_count = 1 OR (gpu_memory_bytes IS NULL AND gpu_name IS NULL));
COMMENT ON COLUMN workers.cpu_cores IS
'CPU threads the worker''s PyTorch computes with (torch.get_num_threads()), 1..1024; NULL: unknown';
COMMENT ON COLUMN workers.gpu_count IS
'1 when the worker trains on a GPU (CUDA or MPS), 0 on the CPU; NULL: unknown (a worker uses one device)';
COMMENT ON COLUMN workers.gpu_memory_bytes IS
'memory of the GPU the worker trains on, 1 byte..1 TiB; NULL: no GPU or unknown';
COMMENT ON COLUMN workers.gpu_name IS
'model of the GPU the worker trains on, as its driver names it (cleaned); NULL: no GPU or unknown';

-- A number a client sent, or NULL when it lies outside lo..hi.
CREATE FUNCTION ganns_api._within(value bigint, lo bigint, hi bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN value BETWEEN lo AND hi THEN value END;
$$;

-- A GPU model name a client sent, as the CHECK on workers.gpu_name wants it, or NULL.
CREATE FUNCTION ganns_api._gpu_name(value text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT nullif(btrim(left(btrim(regexp_replace(regexp_replace(ganns_api._clean(value, 200),
                                                                 '[^A-Za-z0-9 ._()/+-]', '', 'g'),
                                                  ' {2,}', ' ', 'g')), 64)), '');
$$;

-- Registration with the worker's hardware (the body of 003's register, plus the four facts).
CREATE FUNCTION ganns_api.register(p_label text, p_hostname text, p_device text, p_cpu text, p_gpu text,
                                   p_cpu_cores bigint, p_gpu_count bigint, p_gpu_memory_bytes bigint,
                                   p_gpu_name text,
                                   OUT worker_id bigint, OUT worker_name text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_login text := session_user;
    v_label text := ganns_api._clean(p_label, 40);
    v_name text;
    v_gpus integer := ganns_api._within(p_gpu_count, 0, 1);
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
    INSERT INTO public.workers (name, hostname, device, cpu_info, gpu_info, login,
                                cpu_cores, gpu_count, gpu_memory_bytes, gpu_name)
    VALUES (ganns_api._clean(v_name, 120), ganns_api._clean(p_hostname, 255), ganns_api._clean(p_device, 64),
            nullif(ganns_api._clean(p_cpu, 200), ''), nullif(ganns_api._clean(p_gpu, 200), ''), v_login,
            ganns_api._within(p_cpu_cores, 1, 1024), v_gpus,
            CASE WHEN v_gpus = 1 THEN ganns_api._within(p_gpu_memory_bytes, 1, 1099511627776) END,
            CASE WHEN v_gpus = 1 THEN ganns_api._gpu_name(p_gpu_name) END)
    RETURNING id, name INTO worker_id, worker_name;
END
$$;

-- The previous release's call: the same registration, hardware unknown.
CREATE OR REPLACE FUNCTION ganns_api.register(p_label text, p_hostname text, p_device text, p_cpu text, p_gpu text,
                                              OUT worker_id bigint, OUT worker_name text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT r.worker_id, r.worker_name
      FROM ganns_api.register(p_label, p_hostname, p_device, p_cpu, p_gpu, NULL, NULL, NULL, NULL) AS r;
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA ganns_api FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ganns_api.register(text, text, text, text, text, bigint, bigint, bigint, text)
    TO ganns_worker, ganns_coordinator;

-- What the class brings, for the projector: totals over the workers online now, whatever
-- run they are on. Online is what the dashboards call it: not offline, and heard from in
-- the last 30 s (STALE_AFTER_S in ganns_async/cluster_state.py; older ones are shown as
-- "stale"); a student's silent rows cannot pile up here (003 lets 8 per login be online).
-- No argument on purpose: a viewer cannot narrow the totals down to one worker by run or
-- by time. GPU models are grouped by name and memory (whole GiB), the 8 most common first:
-- gpu_models is [{"name": "...", "gib": 12, "count": 2}, ...] (name or gib null when unknown).
-- reporting counts the workers that told their hardware (the previous release does not).
CREATE FUNCTION ganns_view.class_resources(
    OUT workers bigint, OUT reporting bigint, OUT cpu_cores bigint, OUT gpus bigint,
    OUT gpu_memory_bytes bigint, OUT gpu_models jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH online AS (
        SELECT w.cpu_cores, w.gpu_count, w.gpu_memory_bytes, w.gpu_name
          FROM public.workers AS w
         WHERE w.state <> 'offline' AND w.last_seen >= now() - interval '30 seconds'
    ), models AS (
        SELECT o.gpu_name AS name, round(o.gpu_memory_bytes / 1073741824.0)::bigint AS gib, count(*) AS n
          FROM online AS o
         WHERE o.gpu_count = 1
         GROUP BY 1, 2
         ORDER BY n DESC, gib DESC NULLS LAST, name NULLS LAST
         LIMIT 8
    )
    SELECT (SELECT count(*) FROM online),
           (SELECT count(*) FROM online AS o WHERE o.cpu_cores IS NOT NULL OR o.gpu_count IS NOT NULL),
           (SELECT coalesce(sum(o.cpu_cores), 0)::bigint FROM online AS o),
           (SELECT coalesce(sum(o.gpu_count), 0)::bigint FROM online AS o),
           (SELECT coalesce(sum(o.gpu_memory_bytes), 0)::bigint FROM online AS o),
           (SELECT coalesce(jsonb_agg(jsonb_build_object('name', m.name, 'gib', m.gib, 'count', m.n)
                                      ORDER BY m.n DESC, m.gib DESC NULLS LAST, m.name NULLS LAST), '[]'::jsonb)
              FROM models AS m);
$$;
REVOKE ALL ON FUNCTION ganns_view.class_resources() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ganns_view.class_resources() TO ganns_viewer;

INSERT INTO ganns_migrations (name) VALUES ('005_resources');

COMMIT;
