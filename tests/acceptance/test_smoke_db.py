from helpers import cli


def test_migrate_cli(db_url: str) -> None:
    r = cli("db", "migrate", "--db", db_url)
    assert r.returncode == 0, r.stderr
    assert "applied 001_schema" in r.stdout
