"""A student's URL is made from the admin's without the admin's credentials (the logins
themselves: tests/integration/test_roles.py)."""

from __future__ import annotations


def test_a_students_url_never_carries_the_admins_credentials() -> None:
    from ganns_async.logins import login_url

    url = login_url("postgresql://admin:pw@db.example:5432/ganns?sslmode=verify-full&user=admin&password=s3cret"
                    "&sslkey=/k&host=db.example", "alice", "pa ss")
    assert url == "postgresql://alice:pa%20ss@db.example:5432/ganns?sslmode=verify-full&host=db.example"
