"""The settings module, imported fresh in a subprocess with a controlled environment.

(a) With nothing configured the portal runs on its embedded default: its own PostgreSQL server,
in-process Celery, console email. (b) The production profile passes `manage.py check --deploy` without warnings.
(c) The production profile refuses to start without its required secrets.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Every variable portal/settings.py reads that would change the profile under test.
PORTAL_VARIABLES = {
    "DJANGO_SETTINGS_MODULE", "PORTAL_ENV", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS",
    "DATABASE_URL", "PORTAL_EMBEDDED_DB_DIR", "DB_CONN_MAX_AGE", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
    "EMAIL_BACKEND", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "PORTAL_TEST_BROKER_URL",
    "GATEWAY_REFUSE_PRIVATE_PROVIDERS", "GATEWAY_PROVIDER_ALLOWED_NETWORKS",
    # Set by the browser tests for Playwright; never part of a deployment.
    "DJANGO_ALLOW_ASYNC_UNSAFE",
}


def clean_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in PORTAL_VARIABLES}
    env.update(extra)
    return env


def run(args, env, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


PRINT_SETTINGS = """
import json
import portal.settings as s
print(json.dumps({
    "engine": s.DATABASES["default"]["ENGINE"],
    "db_name": str(s.DATABASES["default"]["NAME"]),
    "db_socket_dir": s.DATABASES["default"].get("OPTIONS", {}).get("host"),
    "eager": s.CELERY_TASK_ALWAYS_EAGER,
    "broker": s.CELERY_BROKER_URL,
    "email": s.EMAIL_BACKEND,
    "cache": s.CACHES["default"]["BACKEND"],
    "debug": s.DEBUG,
    "production": s.PRODUCTION,
}))
"""


def test_embedded_default_needs_no_services(embedded_db_dir):
    result = run(["-c", PRINT_SETTINGS], clean_env(PORTAL_EMBEDDED_DB_DIR=str(embedded_db_dir)))
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values["engine"] == "django.db.backends.postgresql"
    assert values["db_socket_dir"] == str(embedded_db_dir)  # the server portal/embedded_db.py started
    assert (embedded_db_dir / "PG_VERSION").exists()
    assert values["eager"] is True
    assert values["broker"] == "memory://"
    assert values["email"] == "django.core.mail.backends.console.EmailBackend"
    assert values["cache"] == "django.core.cache.backends.locmem.LocMemCache"
    assert values["debug"] is True and values["production"] is False


def test_configured_services_replace_the_embedded_default(embedded_db_dir):
    env = clean_env(DATABASE_URL="postgres://u:p@db.example:5432/portal", CELERY_BROKER_URL="redis://cache.example:6379/1",
                    REDIS_URL="redis://cache.example:6379/0", PORTAL_EMBEDDED_DB_DIR=str(embedded_db_dir))
    result = run(["-c", PRINT_SETTINGS], env)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values["engine"] == "django.db.backends.postgresql"
    assert not embedded_db_dir.exists()  # no embedded server was started
    assert values["eager"] is False and values["broker"] == "redis://cache.example:6379/1"
    assert values["cache"] == "django.core.cache.backends.redis.RedisCache"


def production_env(**overrides):
    env = clean_env(
        PORTAL_ENV="production",
        SECRET_KEY=secrets.token_urlsafe(64),  # 86 random characters
        ALLOWED_HOSTS="portal.example.com",
        DATABASE_URL="postgres://portal@db.example:5432/portal",  # the checks do not connect
    )
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def test_production_profile_passes_check_deploy():
    env = production_env()
    assert len(env["SECRET_KEY"]) >= 60
    result = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNINGS" not in output and "ERRORS" not in output, output
    assert "System check identified no issues" in output, output


def test_production_profile_is_checked_with_debug_off():
    """Guard for the test above: the same check fails loudly when the profile is weakened."""
    env = production_env(DEBUG="1")
    result = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    assert result.returncode != 0
    assert "security.W018" in result.stdout + result.stderr  # DEBUG in deployment


@pytest.mark.parametrize(
    ("missing", "message"),
    [("SECRET_KEY", "SECRET_KEY must be set in production"), ("ALLOWED_HOSTS", "ALLOWED_HOSTS must be set in production"),
     ("DATABASE_URL", "DATABASE_URL must be set in production")],
)
def test_production_profile_refuses_to_start_without_required_settings(missing, message):
    env = production_env(**{missing: None})
    assert missing not in env
    result = run(["manage.py", "check"], env)
    assert result.returncode != 0
    assert "django.core.exceptions.ImproperlyConfigured: " + message in result.stderr, result.stderr
    # The same when the settings are imported directly (e.g. by a WSGI server).
    result = run(["-c", "import portal.settings"], env)
    assert result.returncode != 0
    assert "ImproperlyConfigured: " + message in result.stderr, result.stderr


def test_unknown_portal_env_is_refused():
    result = run(["-c", "import portal.settings"], clean_env(PORTAL_ENV="staging"))
    assert result.returncode != 0
    assert "ImproperlyConfigured: PORTAL_ENV must be 'development' or 'production'" in result.stderr


PRINT_PROVIDER_CHECK = """
import json
import portal.settings as s
print(json.dumps([s.GATEWAY_REFUSE_PRIVATE_PROVIDERS, s.GATEWAY_PROVIDER_ALLOWED_NETWORKS]))
"""


@pytest.mark.parametrize(("production", "variables", "expected"), [
    (False, {}, [False, []]),  # the demo and the tests serve providers on loopback
    (True, {}, [True, []]),
    (False, {"GATEWAY_REFUSE_PRIVATE_PROVIDERS": "1"}, [True, []]),
    (True, {"GATEWAY_REFUSE_PRIVATE_PROVIDERS": "0"}, [False, []]),
    (True, {"GATEWAY_PROVIDER_ALLOWED_NETWORKS": "10.0.0.0/8, fd00::/8"}, [True, ["10.0.0.0/8", "fd00::/8"]]),
])
def test_internal_provider_addresses_are_refused_in_production_unless_configured(production, variables, expected):
    env = production_env(**variables) if production else clean_env(**variables)
    result = run(["-c", PRINT_PROVIDER_CHECK], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("networks", ["10.0.0.0/33", "10.0.0.1/8", "localhost"])
def test_malformed_allowed_provider_network_is_refused_at_start_up(networks):
    result = run(["-c", "import portal.settings"], clean_env(GATEWAY_PROVIDER_ALLOWED_NETWORKS=f"fd00::/8,{networks}"))
    assert result.returncode != 0
    assert "ImproperlyConfigured: GATEWAY_PROVIDER_ALLOWED_NETWORKS: " in result.stderr, result.stderr
