"""Model aliases: admins map the model ids tools send by default onto catalog models. One rule
says which catalog model an id names (allowances.aliases); the service refuses what would make it
ambiguous; the catalog page adds and removes them, for admins only."""

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from hypothesis import given
from hypothesis import strategies as st

from allowances import services
from allowances.aliases import AliasTable
from allowances.models import ModelAlias
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped


def url(org, name, **kwargs):
    return reverse(name, kwargs={"org_slug": org.slug, **kwargs})


def aliases_of(org) -> dict[str, str]:
    with unscoped():
        return dict(ModelAlias.all_objects.filter(organization=org.organization)
                    .values_list("alias", "catalog_model__model_id"))


# -- the rule --------------------------------------------------------------------------------------


def test_a_catalog_id_wins_then_an_exact_alias_then_the_longest_prefix():
    table = AliasTable([("gpt-*", "big"), ("gpt-4o-*", "four"), ("gpt-4o-mini-2024-07-18", "mini"),
                        ("claude-sonnet-*", "sonnet")])
    catalog = {"gpt-4o-mini", "big", "four", "mini", "sonnet"}
    assert table.resolve("gpt-4o-mini", catalog) == "gpt-4o-mini"  # a catalog model's own id
    assert table.resolve("gpt-4o-mini-2024-07-18", catalog) == "mini"  # exact beats every prefix
    assert table.resolve("gpt-4o-2024-08-06", catalog) == "four"  # the longer prefix
    assert table.resolve("gpt-5-codex", catalog) == "big"
    assert table.resolve("claude-sonnet-4-5-20250929", catalog) == "sonnet"
    assert table.resolve("claude-opus-5-5", catalog) is None
    assert table.resolve("claude-sonnet-", catalog) == "sonnet"  # the prefix alone matches too


ids = st.text("abcgpt-45.*", min_size=1, max_size=10)


@given(pairs=st.lists(st.tuples(ids.filter(lambda a: a != "*"), st.sampled_from(["m1", "m2", "m3"])), max_size=8),
       requested=ids)
def test_resolution_is_the_longest_matching_alias_whatever_order_they_were_added(pairs, requested):
    pairs = list(dict(pairs).items())  # one target per alias, as the database holds them
    forwards, backwards = AliasTable(pairs).target(requested), AliasTable(list(reversed(pairs))).target(requested)
    assert forwards == backwards
    exact = dict((a, m) for a, m in pairs if not a.endswith("*"))
    matching = [(len(a) - 1, m) for a, m in pairs if a.endswith("*") and requested.startswith(a[:-1])]
    if requested in exact:
        assert forwards == exact[requested]
    elif matching:
        longest = max(length for length, _ in matching)
        assert forwards in {m for length, m in matching if length == longest}
    else:
        assert forwards is None


# -- the service -----------------------------------------------------------------------------------


def test_an_alias_maps_an_id_onto_a_catalog_model_and_is_audited(org_a):
    admin = org_a.members["admin"].user
    with scope(org_a.organization):
        alias = services.model_alias_create(organization=org_a.organization, actor=admin,
                                            alias=" claude-sonnet-4-5-20250929 ", catalog_model=org_a.catalog_model)
    assert alias.alias == "claude-sonnet-4-5-20250929"
    assert aliases_of(org_a)["claude-sonnet-4-5-20250929"] == "gpt-test"
    with unscoped():
        entry = AuditLogEntry.all_objects.get(organization=org_a.organization, action="model_alias.created",
                                              data__alias="claude-sonnet-4-5-20250929")
    assert entry.data["model"] == "gpt-test" and entry.actor == admin


@pytest.mark.parametrize("alias, message", [
    ("", "An alias is a model id"), ("*", "An alias is a model id"), ("gpt *", "An alias is a model id"),
    ("gpt-*-mini", "An alias is a model id"), ("x" * 101, "An alias is a model id"),
    ("gpt-test", "is a catalog model of its own"), ("gpt-test-*", "is already an alias"),
])
def test_an_alias_that_would_be_ambiguous_or_malformed_is_refused(org_a, alias, message):
    before = aliases_of(org_a)
    with scope(org_a.organization), pytest.raises(ValidationError) as raised:
        services.model_alias_create(organization=org_a.organization, actor=None, alias=alias,
                                    catalog_model=org_a.catalog_model)
    assert message in raised.value.message_dict["alias"][0]
    assert aliases_of(org_a) == before


def test_an_alias_cannot_name_another_organizations_model(org_a, org_b):
    with scope(org_a.organization), pytest.raises(ValidationError) as raised:
        services.model_alias_create(organization=org_a.organization, actor=None, alias="gpt-9",
                                    catalog_model=org_b.catalog_model)
    assert "catalog_model" in raised.value.message_dict
    with scope(org_a.organization), pytest.raises(ValidationError):
        services.model_alias_create(organization=org_a.organization, actor=None, alias="gpt-9",
                                    catalog_model=org_b.catalog_model.pk)
    assert "gpt-9" not in aliases_of(org_a)


def test_the_database_refuses_an_alias_of_another_organizations_model(org_a, org_b):
    """The composite foreign key of migration 0009: not only the service keeps aliases in their organization."""
    from django.db import IntegrityError, connection, transaction

    with unscoped(), pytest.raises(IntegrityError, match="model_alias_model_in_organization"), transaction.atomic():
        with connection.cursor() as cursor:  # checked at commit, which a test's transaction never reaches
            cursor.execute("SET CONSTRAINTS model_alias_model_in_organization IMMEDIATE")
        ModelAlias.all_objects.create(organization=org_a.organization, alias="sneaky", catalog_model=org_b.catalog_model)


def test_a_catalog_model_cannot_take_an_aliased_id(org_a):
    with scope(org_a.organization):
        services.model_alias_create(organization=org_a.organization, actor=None, alias="claude-haiku-4-5",
                                    catalog_model=org_a.catalog_model)
        with pytest.raises(ValidationError) as raised:
            services.catalog_model_create(organization=org_a.organization, actor=None, model_id="claude-haiku-4-5",
                                          connection=org_a.provider_connection)
    assert "is an alias of gpt-test" in raised.value.message_dict["model_id"][0]


def test_seeding_adds_only_missing_aliases_of_models_in_the_catalog(org_a):
    with scope(org_a.organization):
        added = services.aliases_seed(organization=org_a.organization, actor=None, aliases={
            "gpt-test-*": "gpt-test", "gpt-5*": "gpt-test", "claude-*": "not-in-catalog", "gpt-test": "gpt-test"})
        again = services.aliases_seed(organization=org_a.organization, actor=None, aliases={"gpt-5*": "gpt-test"})
    assert (added, again) == (1, 0)
    assert aliases_of(org_a) == {"gpt-test-*": "gpt-test", "gpt-5*": "gpt-test"}


# -- the page ----------------------------------------------------------------------------------------


def test_admins_add_and_remove_aliases_on_the_catalog_page(as_admin, org_a):
    page = as_admin.get(url(org_a, "catalog")).content.decode()
    assert 'data-testid="aliases"' in page and "<code>gpt-test-*</code>" in page
    response = as_admin.post(url(org_a, "model_alias_create"), {"alias": "claude-opus-*",
                                                               "catalog_model": org_a.catalog_model.pk}, follow=True)
    assert "Requests for claude-opus-* now go to gpt-test." in [str(m) for m in response.context["messages"]]
    assert aliases_of(org_a)["claude-opus-*"] == "gpt-test"
    with unscoped():
        alias = ModelAlias.all_objects.get(organization=org_a.organization, alias="claude-opus-*")
    response = as_admin.post(url(org_a, "model_alias_delete", model_alias_id=alias.pk), follow=True)
    assert response.status_code == 200 and "claude-opus-*" not in aliases_of(org_a)


def test_a_refused_alias_shows_its_field_error_and_changes_nothing(as_admin, org_a):
    before = aliases_of(org_a)
    response = as_admin.post(url(org_a, "model_alias_create"), {"alias": "gpt-test",
                                                               "catalog_model": org_a.catalog_model.pk})
    assert response.status_code == 400
    assert "is a catalog model of its own" in response.context["alias_form"].errors["alias"][0]
    assert aliases_of(org_a) == before


def test_aliases_are_for_admins_only(login, org_a):
    before = aliases_of(org_a)
    for role in ("hr", "approver", "employee"):
        client = login(org_a.members[role])
        assert client.post(url(org_a, "model_alias_create"), {"alias": "x-*", "catalog_model":
                                                              org_a.catalog_model.pk}).status_code == 403
        assert client.post(url(org_a, "model_alias_delete", model_alias_id=org_a.model_alias.pk)).status_code == 403
    assert aliases_of(org_a) == before
