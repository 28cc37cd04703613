"""Which catalog model a requested model id names: the one rule, for the gateway and the pages.

A catalog model's own id wins; then an exact alias; then the longest alias prefix (`gpt-4o-*`
before `gpt-*`) that the id starts with.
"""

from __future__ import annotations

WILDCARD = "*"


class AliasTable:
    """Aliases of one organization: (alias, catalog model id) pairs, looked up without a query."""

    def __init__(self, pairs):
        self.exact: dict[str, str] = {}
        prefixes = []
        for alias, model_id in pairs:
            if alias.endswith(WILDCARD):
                prefixes.append((alias[:-1], model_id))
            else:
                self.exact[alias] = model_id
        self.prefixes = tuple(sorted(prefixes, key=lambda pair: -len(pair[0])))

    def target(self, requested: str) -> str | None:
        """The catalog model id an alias maps `requested` to, or None."""
        found = self.exact.get(requested)
        if found is not None:
            return found
        for prefix, model_id in self.prefixes:
            if requested.startswith(prefix):
                return model_id
        return None

    def resolve(self, requested: str, catalog_ids) -> str | None:
        """The catalog model id `requested` names: itself if it is one, else its alias's target."""
        return requested if requested in catalog_ids else self.target(requested)
