"""The key format: tap_<public id>_<secret><checksum>, parsed without the database.

Every malformed key is refused by `parse()` with a message that says what is wrong, and through the
API with a 401 whose JSON `detail` says the same, before a single database query. A well-formed key
that matches no row (or the wrong secret for a row) is "no such key".
"""

import re
import zlib

import pytest

from apikeys.secrets import ALPHABET, KEY_LENGTH, PREFIX, MalformedKey, new_key, parse

KEY_SHAPE = re.compile(r"tap_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}")


def checksummed(body: str) -> str:
    """A key with a correct checksum for `body`, computed here independently of the module (CRC32, base62)."""
    number, chars = zlib.crc32(body.encode()), []
    for _ in range(6):
        number, digit = divmod(number, 62)
        chars.append(ALPHABET[digit])
    return body + "".join(reversed(chars))


def flip(key: str, index: int) -> str:
    """The key with one alphanumeric character replaced by another alphanumeric character."""
    replacement = "b" if key[index] == "a" else "a"
    return key[:index] + replacement + key[index + 1:]


# Each malformed key, and a fragment its refusal must contain.
def malformed_cases(key: str) -> dict[str, tuple[str, str]]:
    return {
        "truncated": (key[:-1], f"an API key is {KEY_LENGTH} characters; this one has {KEY_LENGTH - 1}"),
        "truncated_a_lot": (key[:20], f"an API key is {KEY_LENGTH} characters; this one has 20"),
        "extra_character": (key + "x", f"an API key is {KEY_LENGTH} characters; this one has {KEY_LENGTH + 1}"),
        "flipped_in_secret": (flip(key, len(PREFIX) + 12 + 1 + 5), "checksum does not match"),
        "flipped_in_public_id": (flip(key, len(PREFIX) + 3), "checksum does not match"),
        "flipped_in_checksum": (flip(key, KEY_LENGTH - 2), "checksum does not match"),
        "wrong_prefix": ("sk-" + key[3:], "API keys start with 'tap_'"),
        "upper_case_prefix": ("TAP_" + key[4:], "API keys start with 'tap_'"),
        "non_ascii": (key[:30] + "é" + key[31:], "letters and digits in the form"),
        "non_ascii_digit": (key[:30] + "٣" + key[31:], "letters and digits in the form"),  # Arabic-Indic 3
        "separator_moved": (key[:len(PREFIX) + 11] + "_" + key[len(PREFIX) + 11] + key[len(PREFIX) + 13:],
                            "letters and digits in the form"),
        "empty": ("", "API keys start with 'tap_'"),
    }


CASE_NAMES = list(malformed_cases(new_key()[0]))


# -- parse() ---------------------------------------------------------------------------------------------------


def test_new_key_parses_back_to_its_parts():
    seen = set()
    for _ in range(50):
        key, parts = new_key()
        assert parse(key) == parts
        assert key.startswith("tap_") and len(key) == KEY_LENGTH == 55
        assert KEY_SHAPE.fullmatch(key), key
        assert key == f"tap_{parts.public_id}_{parts.secret}{key[-6:]}"
        assert len(parts.public_id) == 12 and len(parts.secret) == 32
        assert checksummed(key[:-6]) == key  # the checksum is CRC32 of everything before it
        seen.add(parts.public_id)
        seen.add(parts.secret)
    assert len(seen) == 100  # random, not repeating


@pytest.mark.parametrize("case", CASE_NAMES)
def test_parse_refuses_each_malformed_key_saying_why(case):
    bad, message = malformed_cases(new_key()[0])[case]
    with pytest.raises(MalformedKey) as caught:
        parse(bad)
    assert message in str(caught.value), str(caught.value)


def test_every_single_character_change_is_caught():
    key, _ = new_key()
    for index in range(len(PREFIX), KEY_LENGTH):
        if key[index] == "_":
            continue
        with pytest.raises(MalformedKey):
            parse(flip(key, index))


def test_a_recomputed_checksum_makes_an_altered_key_well_formed():
    """The checksum catches typos, it is no authentication: the secret is what is checked (below, via the API)."""
    key, parts = new_key()
    altered = checksummed(flip(key, len(PREFIX) + 12 + 1)[:-6])
    assert parse(altered).public_id == parts.public_id
    assert parse(altered).secret != parts.secret


# -- through the API -------------------------------------------------------------------------------------------


def balances(org):
    return f"/api/v1/o/{org.slug}/balances/"


@pytest.mark.parametrize("header", ["HTTP_AUTHORIZATION", "HTTP_X_API_KEY"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_malformed_key_gets_401_naming_the_problem_without_a_database_query(
        client, org_a, django_assert_num_queries, case, header):
    bad, message = malformed_cases(org_a.api_key_secret)[case]
    value = f"Bearer {bad}" if header == "HTTP_AUTHORIZATION" else bad
    if header == "HTTP_X_API_KEY" and not bad:
        value = " "  # an empty x-api-key header is no key at all; a blank one is a (malformed) key
        message = "API keys start with 'tap_'"
    with django_assert_num_queries(0):
        response = client.get(balances(org_a), **{header: value})
    assert response.status_code == 401, response.content
    assert response["Content-Type"] == "application/json"
    assert response["WWW-Authenticate"] == "Bearer"
    detail = response.json()["detail"]
    assert detail.startswith("Invalid API key: ") and message in detail, detail
    assert org_a.api_key_secret not in response.content.decode()


def test_malformed_key_costs_no_query_for_a_logged_in_browser_either(client, org_a, login,
                                                                     django_assert_num_queries):
    """A session cookie next to the key header: the session and auth middlewares stay lazy."""
    login(org_a.members["employee"])
    assert client.get(f"/o/{org_a.slug}/").status_code == 200  # the session is real and in use
    with django_assert_num_queries(0):
        response = client.get(balances(org_a), HTTP_AUTHORIZATION="Bearer " + org_a.api_key_secret[:-1])
    assert response.status_code == 401
    assert "truncated" in response.json()["detail"]


def test_malformed_key_against_an_unknown_organization_is_still_refused_without_queries(
        client, org_a, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/api/v1/o/no-such-org/balances/", HTTP_X_API_KEY="tap_short")
    assert response.status_code == 401
    assert "characters" in response.json()["detail"]


def test_well_formed_key_with_unknown_public_id_is_no_such_key(client, org_a):
    unknown, _ = new_key()
    response = client.get(balances(org_a), HTTP_AUTHORIZATION=f"Bearer {unknown}")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid API key: no such key."}


def test_well_formed_key_with_wrong_secret_is_no_such_key(client, org_a):
    key = org_a.api_key_secret
    wrong_secret = checksummed(flip(key, len(PREFIX) + 12 + 1 + 10)[:-6])
    assert parse(wrong_secret).public_id == org_a.api_key.public_id  # well-formed, same row
    for attempt in range(2):  # also once the key's row is cached
        response = client.get(balances(org_a), HTTP_AUTHORIZATION=f"Bearer {wrong_secret}")
        assert response.status_code == 401
        assert response.json() == {"detail": "Invalid API key: no such key."}, attempt
    assert client.get(balances(org_a), HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    response = client.get(balances(org_a), HTTP_AUTHORIZATION=f"Bearer {wrong_secret}")
    assert response.json() == {"detail": "Invalid API key: no such key."}


def test_key_with_surrounding_whitespace_is_accepted(client, org_a):
    response = client.get(balances(org_a), HTTP_X_API_KEY=f"  {org_a.api_key_secret} ")
    assert response.status_code == 200, response.content

