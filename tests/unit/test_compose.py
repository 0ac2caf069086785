"""compose.yaml starts the class's server: the official image, the migrations applied on
first start and nothing else, data where the pinned major keeps it, a health check, and no
secret in the file. (The files it hands to the entrypoint, run through psql against a real
server: tests/acceptance/test_compose_init.py.)"""

from __future__ import annotations

import re

import pytest

from ganns_async.migrate import load_migrations
from helpers import (
    COMPOSE_FILE,
    INITDB_DIR,
    REPO,
    compose_defaults,
    compose_environment,
    compose_initdb_files,
    compose_mounts,
    compose_postgres_service,
    image_major,
    image_repository,
    load_compose,
)

# Where the official image keeps its data, and so where the named volume must be mounted:
# up to 17 its VOLUME is the data directory itself; 18 moved PGDATA to
# /var/lib/postgresql/18/docker and refuses to start with a mount at .../data.
DATA_MOUNT_BEFORE_18 = "/var/lib/postgresql/data"
DATA_MOUNT_FROM_18 = "/var/lib/postgresql"

# compose.yaml's arithmetic for max_connections (see its comment): 40 students with two
# workers each at 2 connections, the coordinator and its dashboard, 5 watches, 5 for ops,
# and the superuser's reserved 3.
CLASS_CONNECTIONS = 40 * 2 * 2 + 11 + 5 * 3 + 5 + 3

REQUIRED = re.compile(r"^\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")
OVERRIDE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:-[^}]+\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def server(compose: dict) -> dict:
    return compose_postgres_service(compose)[1]


def test_the_official_postgres_image_with_a_pinned_major_and_an_override(server: dict) -> None:
    image = server["image"]
    assert image_repository(image) == "postgres", image
    assert re.fullmatch(r"postgres:\$\{GANNS_PG_VERSION:-\d+\}", image), \
        f"{image!r}: pin a major with an override, postgres:${{GANNS_PG_VERSION:-NN}}"
    # 17+: the instructor's role gets MAINTAIN on the blob tables (sql/003_roles.sql), so the
    # coordinator can VACUUM them although the superuser applied the migrations.
    assert image_major(image) >= 17, image


def test_image_helpers_read_every_spelling() -> None:
    assert image_repository("postgres:${GANNS_PG_VERSION:-17}") == "postgres"
    assert image_repository("docker.io/library/postgres:17") == "postgres"
    assert image_repository("bitnami/postgresql:17") == "bitnami/postgresql"
    assert image_repository("evil.example/postgres:17") == "evil.example/postgres"
    assert image_major("postgres:${GANNS_PG_VERSION:-18}") == 18
    assert image_major("postgres:17.4-bookworm") == 17
    assert image_major("postgres:16-alpine") == 16
    with pytest.raises(AssertionError):
        image_major("postgres:latest")


def test_every_migration_runs_on_first_start_in_order_and_nothing_else(server: dict) -> None:
    runs = compose_initdb_files(server)
    migrations = load_migrations(REPO / "sql")
    assert migrations, "no migrations in sql/"
    expected = [(f"{INITDB_DIR}/{m.name}.sql", (REPO / "sql" / f"{m.name}.sql").resolve()) for m in migrations]
    extra = [name for name, _ in runs if name not in {n for n, _ in expected}]
    assert not extra, (f"the postgres entrypoint would also run {extra} on first start: sql/ is mounted at "
                       f"{INITDB_DIR}, so keep only NNN_name.sql migrations there")
    assert runs == expected
    # The entrypoint sorts with the shell's glob in the image's locale: distinct NNN prefixes
    # make that order the numeric one under any collation.
    prefixes = [name.rsplit("/", 1)[1][:3] for name, _ in runs]
    assert len(set(prefixes)) == len(prefixes), f"two migrations share a number: {prefixes}"
    # The named queries are no migration: executed, their $1 parameters would fail the start.
    assert all(path.name != "queries.sql" for _, path in runs)


def test_migrations_are_mounted_read_only(server: dict) -> None:
    initdb = [m for m in compose_mounts(server) if str(m.get("target", "")).startswith(INITDB_DIR)]
    assert initdb, f"nothing mounted at {INITDB_DIR}"
    for mount in initdb:
        assert mount.get("type") == "bind" and mount.get("read_only") is True, mount


def test_initdb_listing_models_the_entrypoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The model of the entrypoint the tests above rely on: dot files, subfolders and other
    endings are ignored, .sh and compressed SQL would run, a file bind shadows the folder's."""
    sql = tmp_path / "sql"
    (sql / "sub").mkdir(parents=True)
    for name in ("002_b.sql", "001_a.sql", ".hidden.sql", "notes.md", "x.sh", "y.sql.gz", "sub/003_c.sql"):
        (sql / name).write_text("")
    (tmp_path / "other.sql").write_text("")
    service = {"volumes": ["./sql:/docker-entrypoint-initdb.d:ro",
                           {"type": "bind", "source": "./other.sql", "target": f"{INITDB_DIR}/001_a.sql"}]}
    assert [(n.rsplit("/", 1)[1], p.name) for n, p in compose_initdb_files(service, tmp_path)] == [
        ("001_a.sql", "other.sql"), ("002_b.sql", "002_b.sql"), ("x.sh", "x.sh"), ("y.sql.gz", "y.sql.gz")]


def test_data_volume_is_declared_and_mounted_where_the_pinned_major_keeps_its_data(compose: dict, server: dict) -> None:
    major = image_major(server["image"])
    want = DATA_MOUNT_FROM_18 if major >= 18 else DATA_MOUNT_BEFORE_18
    env = compose_environment(server)
    assert "PGDATA" not in env, "the mount follows the image's own PGDATA; do not move it"
    data = [m for m in compose_mounts(server) if str(m.get("target", "")).rstrip("/").startswith("/var/lib/postgresql")]
    assert [(m.get("type"), str(m.get("target")).rstrip("/")) for m in data] == [("volume", want)], \
        f"postgres {major} keeps its data under {want}: mount one named volume there, found {data}"
    assert data[0]["source"] in (compose.get("volumes") or {}), f"volume {data[0]['source']!r} is not declared"


def test_healthcheck_asks_pg_isready_over_tcp_as_the_right_user_and_database(server: dict) -> None:
    test = server["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD" and test[1] == "pg_isready", test
    args = dict(zip(test[2::2], test[3::2]))
    env = compose_environment(server)
    assert args.get("-U") == env.get("POSTGRES_USER", "postgres"), test
    assert args.get("-d") == env["POSTGRES_DB"], test
    # The entrypoint's temporary server, which runs the migrations, listens on its socket only.
    assert args.get("-h") in ("127.0.0.1", "localhost"), test


def test_password_comes_from_the_environment_and_is_required(server: dict) -> None:
    env = compose_environment(server)
    match = REQUIRED.match(env.get("POSTGRES_PASSWORD", ""))
    assert match and match.group("var") == "POSTGRES_PASSWORD", env.get("POSTGRES_PASSWORD")
    assert env.get("POSTGRES_HOST_AUTH_METHOD", "scram-sha-256") not in ("trust", "password", "md5")
    assert env.get("POSTGRES_DB") == "ganns"  # the database name the README's URLs use


def test_no_secret_is_written_in_the_file(compose: dict) -> None:
    for name, service in compose["services"].items():
        for key, value in compose_environment(service).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key) and not key.endswith("_FILE"):
                assert REQUIRED.match(value), f"{name}: {key} is written in the file; take it from the environment"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    # A URL with a literal password (a reference to $POSTGRES_PASSWORD is fine).
    assert not re.search(r"postgres(?:ql)?://[^/\s:@]+:(?!\$)[^@\s]+@", text)


def test_port_can_be_overridden(server: dict) -> None:
    ports = [str(p) for p in server["ports"]]
    assert len(ports) == 1
    host, _, container = ports[0].rpartition(":")
    assert container == "5432" and OVERRIDE.match(host) and compose_defaults(host) == "5432", ports


def test_max_connections_fits_a_class_of_40(server: dict) -> None:
    command = server["command"]
    command = command if isinstance(command, list) else command.split()
    settings = dict(arg.split("=", 1) for arg in command if "=" in arg)
    assert int(settings["max_connections"]) >= CLASS_CONNECTIONS, settings
