"""Logins for the class: one per person, in one of the roles of ``sql/003_roles.sql``.

``ganns-async db add-student alice`` is ``CREATE ROLE alice LOGIN ... IN ROLE ganns_worker``
plus a connection limit and statement timeouts, and prints the URL alice should use.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg

from ganns_async.db import connect, queries, with_environment
from ganns_async.errors import UserError

# What each kind of login is for, as ``db add-login --role`` names them.
ROLES = {"student": "worker", "instructor": "coordinator", "viewer": "viewer"}


# Query options that name or prove a login: never carried from the admin's URL into a
# student's (libpq lets ?user= override the name before the @).
_CREDENTIAL_OPTIONS = {"user", "password", "passfile", "sslcert", "sslkey", "sslpassword", "service"}


def login_url(admin_url: str, name: str, password: str | None, *, database: str | None = None) -> str:
    """``admin_url`` (same server, database and options, without the admin's credentials)
    with the login ``name`` instead. What the admin's URL leaves to libpq's variables
    (PGHOST, PGPORT, PGDATABASE, PGSSLMODE; or all of it, for an admin connected through
    them) is written out: the person gets the URL, not the admin's environment. ``database``
    (the server's current_database()) names the database when nothing else does, since a
    login's default database would be one named after the login."""
    parts = urlsplit(with_environment(admin_url))
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in _CREDENTIAL_OPTIONS]
    path = parts.path
    if path in ("", "/") and not {k.lower() for k, _ in pairs} & {"dbname", "database"} and database:
        path = "/" + quote(database, safe="")
    query = urlencode(pairs, safe="/")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = f":{parts.port}" if parts.port else ""
    user = quote(name, safe="")
    if password is not None:
        user += ":" + quote(password, safe="")
    return urlunsplit((parts.scheme, f"{user}@{host}{port}", path, query, parts.fragment))


async def add_login(admin_url: str, name: str, role: str = "student", password: str | None = None,
                    *, generate_password: bool = True) -> str:
    """Create the login and return its URL. ``admin_url`` needs CREATEROLE (or a superuser)."""
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: choose {', '.join(ROLES)}")
    if password is None and generate_password:
        password = secrets.token_urlsafe(12)
    conn = await connect(admin_url, application_name="ganns-async db")
    try:
        await conn.execute(queries()["add_login"], name, password, ROLES[role])
        database = await conn.fetchval(queries()["current_database"])
    except asyncpg.exceptions.DuplicateObjectError:
        raise UserError(f"login {name!r} exists already (on this server; logins are server-wide)") from None
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        raise UserError(f"cannot create login {name!r}: {exc} (connect as a user with CREATEROLE)") from None
    except asyncpg.exceptions.UndefinedFunctionError:
        raise UserError("the database is not migrated: run `ganns-async db migrate --db URL` first") from None
    except asyncpg.exceptions.InvalidSchemaNameError:
        raise UserError("the database is not migrated: run `ganns-async db migrate --db URL` first") from None
    except asyncpg.exceptions.InvalidParameterValueError as exc:
        raise UserError(f"cannot create login {name!r}: {exc}") from None
    finally:
        await conn.close()
    return login_url(admin_url, name, password, database=database)
