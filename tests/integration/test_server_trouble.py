"""A server out of disk, memory or connection slots: one-shot commands say so in one line
(the long-running ones wait it out: tests/acceptance/test_chaos.py)."""

from __future__ import annotations

import json

import asyncpg
import pytest

from helpers import _fetch, _run, assert_one_line_error, cli_in_process, disk_full_sql

pytestmark = pytest.mark.usefixtures("keep_logging")


async def _running_run_on_a_full_disk(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        run_id = await conn.fetchval("INSERT INTO runs (config, dataset_fingerprint, dataset_size, status) "
                                     "VALUES ($1, 'fp', 100, 'running') RETURNING id", json.dumps({}))
        await conn.execute(disk_full_sql("runs"))
        return int(run_id)
    finally:
        await conn.close()


def test_control_on_a_full_disk_says_so_in_one_line(migrated_url: str) -> None:
    run_id = _run(_running_run_on_a_full_disk(migrated_url))
    r = cli_in_process("control", "pause", "--db", migrated_url)
    assert_one_line_error(r, "the database server is out of resources", "No space left on device",
                          "(Check free disk space)", "admin")
    assert _run(_fetch(migrated_url, "SELECT status FROM runs WHERE id = $1", run_id))[0]["status"] == "running"
