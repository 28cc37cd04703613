"""No query a directory sends makes the SCIM API fail: a filter on any attribute with a value of
the wrong type, a page far beyond the end or a count out of any range, junk attribute lists; each is
a SCIM error the directory can read (400 invalidFilter / invalidValue) or a plain answer."""

import pytest

from identity.scim.filters import GROUP_FIELDS, USER_FIELDS

pytestmark = pytest.mark.django_db

VALUES = ["5", "-1", "99999999999999999999", "1.5", "true", "false", "null", '"x"', '"2024-01-01T00:00:00Z"',
          '"not a date"', '"a\\u0000b"', '""']
OPERATORS = ["eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le"]


def filters(fields):
    for attribute in fields:
        for op in OPERATORS:
            for value in VALUES:
                yield f"{attribute} {op} {value}"
        yield f"{attribute} pr"


JUNK = ["", "(", "userName eq", "userName zz 1", "foo eq 1", "emails[value eq 5]", "emails[type eq \"work\"].value",
        "not (active eq 5)", "a" * 5000, "userName eq \"x\" and (" * 50]
PAGES = [{"startIndex": value} for value in ("0", "-5", "99999999999999999999", "9" * 5000, "x", "1e3", " ")] + [
    {"count": value} for value in ("0", "-5", "99999999999999999999", "x", "9" * 5000)] + [
    {"attributes": value} for value in ("", ",", "userName,,", "urn:x:y", "name.givenName.x", "\x00", "a" * 5000)] + [
    {"excludedAttributes": value} for value in ("id", "urn:ietf:params:scim:schemas:core:2.0:User:bogus", "[")]


def get(client, org, resource, params):
    response = client.get(f"/scim/v2/o/{org.slug}/{resource}", params,
                          HTTP_AUTHORIZATION=f"Bearer {org.scim_token_secret}")
    assert response.status_code in (200, 400), (params, response.status_code, response.content[:300])
    if response.status_code == 400:
        body = response.json()
        assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"], body
        assert body.get("scimType") in ("invalidFilter", "invalidValue", "invalidPath", "invalidSyntax"), body
    return response


@pytest.mark.parametrize("resource, fields", [("Users", USER_FIELDS), ("Groups", GROUP_FIELDS)])
def test_no_filter_makes_a_server_error(client, org_a, resource, fields):
    for text in [*filters(fields), *JUNK]:
        get(client, org_a, resource, {"filter": text})


@pytest.mark.parametrize("resource", ["Users", "Groups", "one User"])
@pytest.mark.parametrize("params", PAGES, ids=repr)
def test_no_paging_or_attributes_make_a_server_error(client, org_a, resource, params):
    if resource == "one User":
        resource = f"Users/{org_a.members['employee'].pk}"
    get(client, org_a, resource, params)


def test_a_page_beyond_the_end_is_empty_and_says_where_it_starts(client, org_a):
    body = get(client, org_a, "Users", {"startIndex": "99999999999999999999", "count": "99999999999999999999"}).json()
    assert (body["totalResults"], body["itemsPerPage"], body.get("Resources", [])) == (5, 0, [])


def test_a_date_filter_compares_dates(client, org_a):
    assert get(client, org_a, "Users", {"filter": 'meta.created gt "2000-01-01T00:00:00Z"'}).json()["totalResults"] == 5
    assert get(client, org_a, "Users", {"filter": 'meta.created lt "2000-01-01T00:00:00Z"'}).json()["totalResults"] == 0
    response = get(client, org_a, "Users", {"filter": "meta.created gt 5"})
    assert (response.status_code, response.json()["scimType"]) == (400, "invalidFilter")
