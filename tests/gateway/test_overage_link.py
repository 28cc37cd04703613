"""The gateway's 429 for a spent allowance links to the overage request form, filled in with what
the refused request was short of and its model; the link opens that form for the member."""

import re
from urllib.parse import parse_qs, urlsplit

import anthropic
import openai
import pytest

from allowances import ledger
from allowances.ledger import verify
from overage import services
from portal.tenancy import scope

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Hi"}]
LEFT = 50  # what the employee has left: less than any request holds
LINK = re.compile(r"Request more at (\S+)")


@pytest.fixture
def spent(metered):
    """The fixture employee's 5,000 tokens (1,000 of them held) used down to LEFT."""
    account = metered.org.account
    with scope(account.organization):
        account.refresh_from_db()
        ledger.settle(hold=ledger.authorize(account=account, tokens=account.available - LEFT,
                                            idempotency_key="earlier"), used_tokens=account.available - LEFT)
    return metered


def link_in(message: str) -> tuple[str, dict]:
    url = LINK.search(message).group(1)
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}", {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_the_openai_429_links_to_the_form_with_the_shortfall_and_the_model(spent, login):
    metered = spent
    with scope(metered.org.organization):  # the fixture's own pending request would be shown instead
        services.overage_request_cancel(overage_request=metered.org.overage_request, actor_member=metered.member)
    client = openai.OpenAI(api_key=metered.key, base_url=metered.url, max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="fake-gpt", messages=PROMPT, max_tokens=50)
    message = raised.value.message
    requested = int(re.search(r"may use up to ([\d,]+) tokens", message).group(1).replace(",", ""))
    address, query = link_in(message)
    # No PORTAL_BASE_URL: the link points at the host and port the request came in on (not 8000).
    assert address == f"{metered.url.removesuffix('/v1')}/o/{metered.org.slug}/overage/new/"
    assert "remaining balance is 50 tokens" in message
    assert query == {"tokens": str(requested - LEFT), "model": "fake-gpt"}

    page = login(metered.member).get(urlsplit(LINK.search(message).group(1)).path, query)
    assert page.status_code == 200
    assert page.context["form"].initial == page.context["form"].initial | {"tokens": str(requested - LEFT),
                                                                          "model": "fake-gpt"}
    assert metered.upstream.requests == []
    assert verify() == []


def test_the_anthropic_429_links_to_the_form_with_its_model_too(spent):
    metered = spent
    client = anthropic.Anthropic(api_key=metered.key, base_url=metered.url.removesuffix("/v1"), max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(model="fake-claude", max_tokens=50, messages=PROMPT)
    _address, query = link_in(raised.value.body["error"]["message"])
    assert query["model"] == "fake-claude" and int(query["tokens"]) > 0
