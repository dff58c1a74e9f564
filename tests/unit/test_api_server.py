"""The template of Prefect's database: kept once, copied into new Prefect homes, never over a database."""

from __future__ import annotations

import sqlite3

import pytest

from medflow import api_server


@pytest.fixture
def homes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)

    def use(name):
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        monkeypatch.setenv("PREFECT_HOME", str(home))
        return home / "prefect.db"
    return use


def _make_db(path, value):
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")  # as Prefect's server runs it
    con.execute("CREATE TABLE alembic_version (version_num TEXT)")
    con.execute("INSERT INTO alembic_version VALUES (?)", (value,))
    con.commit()
    return con  # left open: the template is taken while the server holds its database


def _version(path):
    with sqlite3.connect(path) as con:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_new_home_gets_a_copy_of_the_first_migrated_database(homes):
    first = homes("first")
    con = _make_db(first, "head-1")
    assert not api_server.seed_home()  # nothing to copy yet; the home has its own database anyway
    api_server.save_template()
    con.close()
    template = api_server.template_path()
    assert template.is_file() and _version(template) == "head-1"
    assert not list(template.parent.glob(".*tmp"))

    second = homes("second")
    assert api_server.seed_home()
    assert _version(second) == "head-1"


def test_an_existing_database_is_never_replaced_nor_a_template_overwritten(homes):
    _make_db(homes("a"), "head-1").close()
    api_server.save_template()
    own = homes("b")
    _make_db(own, "runs-of-b").close()
    assert not api_server.seed_home()
    assert _version(own) == "runs-of-b"
    api_server.save_template()  # a template exists: kept as it is
    assert _version(api_server.template_path()) == "head-1"


def test_another_database_url_is_left_alone(homes, monkeypatch):
    _make_db(homes("a"), "head-1").close()
    api_server.save_template()
    fresh = homes("c")
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert not api_server.seed_home()
    assert not fresh.exists()


EMBEDDED = """
import json, os, sys
import httpx
from medflow import settings, api_server
settings.configure(sys.argv[1])
api_server.start_early()
api_server.wait()
from prefect.server.api.server import SubprocessASGIServer
base = SubprocessASGIServer().api_url
body = {"limit": 1}
out = {
    "anonymous": httpx.post(f"{base}/flow_runs/filter", json=body).status_code,
    "anonymous_create": httpx.post(f"{base}/flows/", json={"name": "intruder"}).status_code,
    "foreign_origin": httpx.options(f"{base}/flow_runs/filter", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}).headers.get(
        "access-control-allow-origin"),
    "own_client": None,
}
from prefect import get_client
with get_client(sync_client=True) as client:
    out["own_client"] = len(client.read_flow_runs(limit=1)) >= 0
home = os.environ["PREFECT_HOME"]
out["home_mode"] = oct(os.stat(home).st_mode & 0o777)
out["db_mode"] = oct(os.stat(os.path.join(home, "prefect.db")).st_mode & 0o777)
api_server.stop()
print(json.dumps(out))
"""


def test_the_embedded_server_of_a_run_refuses_other_local_users_and_web_pages(tmp_path):
    """What `medflow run` starts without a standing server: a credential only this process has, CORS closed,
    its Prefect home and database private."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDFLOW_"))}
    env["MEDFLOW_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", EMBEDDED, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["anonymous"] == 401 and out["anonymous_create"] == 401
    assert out["foreign_origin"] in (None, "https://medflow.invalid")
    assert out["own_client"] is True  # the run's own client is let in
    assert out["home_mode"] == "0o700" and out["db_mode"] == "0o600"
