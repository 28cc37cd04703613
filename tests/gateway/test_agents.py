"""Real coding agents against a live gateway, with a minted key and their own default settings
other than the base URL and the key: Claude Code (`claude -p`) and Codex CLI (`codex exec`), as
installed by `make test` from the npm registry (package.json, package-lock.json). Each completes a
one-turn task in which the sandbox answers with a tool call, the agent runs the tool and sends its
result, and the sandbox ends the turn in text; every request is metered and the ledger verifies.

The agents ask for their vendors' current models (Claude Code for claude-opus-..., Codex CLI for
gpt-6...), which the organization's administrators map onto its sandbox model with aliases.
"""

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from allowances import services as allowance_services
from apikeys import services as api_key_services
from gateway import sandbox
from portal.tenancy import scope
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after
from tests.gateway.test_concurrency import set_available

pytestmark = pytest.mark.transactional

BIN = Path(settings.BASE_DIR) / "node_modules" / ".bin"


def agent(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: `make test` installs the test agents (npm ci)"
    return str(path)


@pytest.fixture
def employee_key(org_a, gateway_url):
    """Org A's employee with a fresh key (the scopes a new key gets by default), room for the
    agents' long prompts, and aliases sending Claude's and GPT's ids to the sandbox model."""
    member, admin = org_a.members["employee"], org_a.members["admin"].user
    with scope(org_a.organization):
        for alias in ("claude-*", "gpt-*"):
            allowance_services.model_alias_create(organization=org_a.organization, actor=admin, alias=alias,
                                                  catalog_model=org_a.catalog_model)
        _key, secret = api_key_services.api_key_create(member=member, actor=member.user, name="laptop: agents",
                                                       endpoints=["chat", "responses", "messages"])
    set_available(org_a, member, 500_000)
    return member, secret


def run(command: list[str], *, cwd: Path, env: dict, timeout: int = 180) -> str:
    environment = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TERM": "dumb"} | env
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


def assert_metered(member, record_id, *, endpoint: str, requested_prefix: str, before):
    records = records_after(record_id)
    assert len(records) >= 2, records  # the tool call, and the reply to its result
    assert {(r.endpoint, r.status, r.model, r.uncharged_tokens) for r in records} == {
        (endpoint, "ok", "gpt-test", 0)}
    assert all(r.requested_model.startswith(requested_prefix) for r in records)
    assert all(r.input_tokens > 1_000 and r.charged_tokens > 0 for r in records)  # an agent's real prompt
    granted, held, used = before
    assert balance(member) == (granted, held, used + sum(r.charged_tokens for r in records))
    out = io.StringIO()
    call_command("verify_ledger", stdout=out)
    assert "ledger verified" in out.getvalue()


def test_claude_code_completes_a_task_with_a_tool_call_answered_by_the_sandbox(employee_key, gateway_url, tmp_path):
    member, secret = employee_key
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    notes = work / "notes.txt"
    notes.write_text("the launch code is tangerine-42\n")
    before, record_id = balance(member), last_record_id()

    out = run([agent("claude"), "-p", f"Read `{notes}` and tell me what it says.", "--output-format", "stream-json",
               "--verbose"], cwd=work, env={"HOME": str(home), "ANTHROPIC_BASE_URL": gateway_url.removesuffix("/v1"),
                                            "ANTHROPIC_API_KEY": secret})

    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    blocks = [block for event in events if event["type"] in ("assistant", "user")
              for block in event["message"]["content"] if isinstance(block, dict)]
    (call,) = [block for block in blocks if block["type"] == "tool_use"]
    assert (call["name"], call["input"]) == ("Read", {"file_path": str(notes)})
    (result,) = [block for block in blocks if block["type"] == "tool_result"]
    assert result["tool_use_id"] == call["id"] and "tangerine-42" in json.dumps(result["content"])
    final = events[-1]
    assert (final["type"], final["subtype"], final["is_error"]) == ("result", "success", False)
    # The sandbox's reply text, from wherever its prompt's seed starts it (the agent's prompt varies).
    words = final["result"].split()
    assert final["num_turns"] == 2 and words and all(word in sandbox.REPLY_WORDS for word in words), final["result"]
    assert_metered(member, record_id, endpoint="messages", requested_prefix="claude-", before=before)


def test_codex_cli_completes_a_task_with_a_tool_call_answered_by_the_sandbox(employee_key, gateway_url, tmp_path):
    member, secret = employee_key
    work, home = tmp_path / "work", tmp_path / "codex"
    work.mkdir(), home.mkdir()
    (home / "config.toml").write_text(
        'model_provider = "portal"\n\n[model_providers.portal]\nname = "Token allowance portal"\n'
        f'base_url = "{gateway_url}"\nenv_key = "PORTAL_API_KEY"\nwire_api = "responses"\n')
    before, record_id = balance(member), last_record_id()

    out = run([agent("codex"), "exec", "--json", "--skip-git-repo-check",
               "Use exec to run `text(6 * 7)` and tell me the result."],
              cwd=work, env={"HOME": str(home), "CODEX_HOME": str(home), "PORTAL_API_KEY": secret})

    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events[-1]["type"] == "turn.completed"
    assert [e["item"]["type"] for e in events if e["type"] == "item.completed"] == ["agent_message"]
    # The turn's transcript: the sandbox's call of Codex's `exec` tool, and what running it returned.
    (transcript,) = (home / "sessions").rglob("*.jsonl")
    items = [json.loads(line).get("payload") or {} for line in transcript.read_text().splitlines()]
    (call,) = [item for item in items if item.get("type") == "custom_tool_call"]
    assert (call["name"], call["input"]) == ("exec", "text(6 * 7)")
    (result,) = [item for item in items if item.get("type") == "custom_tool_call_output"]
    assert result["call_id"] == call["call_id"] and "42" in json.dumps(result["output"])
    assert_metered(member, record_id, endpoint="responses", requested_prefix="gpt-", before=before)
