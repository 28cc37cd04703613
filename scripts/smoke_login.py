"""Log in as the demo HR user printed by `make run` and check that the members page lists the org."""

import os
import re
import sys
import time

import httpx

base, log_path, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(600):
    try:
        if httpx.get(base + "/accounts/login/").status_code == 200:
            break
    except httpx.TransportError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("make run exited before serving:\n" + open(log_path).read())
    time.sleep(0.5)
else:
    sys.exit("make run did not serve within 5 minutes:\n" + open(log_path).read())
log = open(log_path).read()
match = re.search(r"^login (hr@\S+) (\S+) hr$", log, re.MULTILINE)
if not match:
    sys.exit(f"make run printed no HR login:\n{log}")
email, password = match.groups()

with httpx.Client(base_url=base, follow_redirects=True) as client:
    page = client.get("/accounts/login/")
    token = client.cookies["csrftoken"]
    page = client.post("/accounts/login/", data={"login": email, "password": password, "csrfmiddlewaretoken": token},
                       headers={"Referer": base + "/accounts/login/"})
    if "Members" not in page.text:
        sys.exit(f"the HR user did not land on a page with Members after login: {page.url}")
    org = re.search(r"/o/([\w-]+)/", str(page.url)).group(1)
    members = client.get(f"/o/{org}/members/")
    if members.status_code != 200 or email not in members.text:
        sys.exit(f"members page answered {members.status_code} without {email}")
    if client.get("/static/css/portal.css").status_code != 200 or client.get("/static/js/portal.js").status_code != 200:
        sys.exit("the stylesheet or the script is not served")
    # No PORTAL_BASE_URL: the snippets point where make run serves (HOST_PORT), not at port 8000.
    keys = client.get(f"/o/{org}/keys/")
    if f'OPENAI_BASE_URL={base}/v1' not in keys.text:
        sys.exit(f"the keys page's snippets do not point at {base}")

# The API keys seed_demo printed work against the sandbox provider at once, offline.
key = re.search(r"^api key for (\S+): (tap_\S+)$", log, re.MULTILINE)
if not key:
    sys.exit(f"make run printed no API key:\n{log}")
reply = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key.group(2)}"},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20})
if reply.status_code != 200 or not reply.json()["choices"][0]["message"]["content"]:
    sys.exit(f"the demo key's chat completion answered {reply.status_code}: {reply.text[:500]}")
