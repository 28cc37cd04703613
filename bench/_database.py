"""A benchmark's own database on the server `scripts/with-services.sh` started, migrated afresh."""

import os

import psycopg
from django.core.management import call_command


def database_url(name: str) -> str:
    return os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"


def create_database(name: str) -> None:
    with psycopg.connect(database_url("postgres"), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    call_command("migrate", verbosity=0)
