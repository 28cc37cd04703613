"""Who the demo seed creates: two organizations, each with an owner, HR, an approver and three employees."""

DEMO_PASSWORD = "demo-password-2026"


def _people(domain: str, first_names: list[str]) -> list[dict]:
    owner, hr, approver, *employees = first_names
    roles = [("owner", ["owner"]), ("hr", ["hr"]), ("approver", ["approver"])]
    people = [
        {"email": f"{label}@{domain}", "first_name": name, "last_name": "Demo", "roles": role, "team": "Engineering"}
        for (label, role), name in zip(roles, [owner, hr, approver])
    ]
    for index, name in enumerate(employees):
        people.append({
            "email": f"{name.lower()}@{domain}", "first_name": name, "last_name": "Demo", "roles": ["employee"],
            "team": "Engineering" if index < 2 else "Research",
        })
    return people


DEMO_ORGANIZATIONS = [
    {
        "name": "Acme Robotics", "slug": "acme", "time_zone": "Europe/Berlin", "currency": "EUR",
        "teams": ["Engineering", "Research"],
        "people": _people("acme.example", ["Olivia", "Hannah", "Arthur", "Alice", "Bob", "Carol"]),
    },
    {
        "name": "Globex", "slug": "globex", "time_zone": "America/New_York", "currency": "USD",
        "teams": ["Engineering", "Research"],
        "people": _people("globex.example", ["Oscar", "Harriet", "Amir", "Dave", "Erin", "Frank"]),
    },
]
