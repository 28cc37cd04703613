"""Discover every URL pattern of the project, for tests that must cover routes nobody listed."""

from dataclasses import dataclass

from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RegexPattern, RoutePattern


@dataclass(frozen=True)
class Route:
    parts: tuple  # the route's patterns, outermost first
    name: str | None
    namespace: str
    callback: object

    @property
    def route(self) -> str:
        return "".join(str(part.pattern) for part in self.parts)

    @property
    def kwarg_names(self) -> list[str]:
        names = []
        for part in self.parts:
            if isinstance(part.pattern, RoutePattern):
                names.extend(part.pattern.converters)
            else:
                names.extend(part.pattern.regex.groupindex)
        return names

    def build(self, **values) -> str | None:
        """The concrete path for these kwarg values, or None when a regex route cannot be filled."""
        path = "/"
        for part in self.parts:
            pattern = part.pattern
            if isinstance(pattern, RoutePattern):
                text = str(pattern)
                for name in pattern.converters:
                    start = text.index("<")
                    end = text.index(">", start)
                    text = text[:start] + str(values[name]) + text[end + 1:]
                path += text
            elif isinstance(pattern, RegexPattern):
                regex = pattern.regex.pattern
                if pattern.regex.groupindex or any(ch in regex.strip("^$") for ch in "[](|?*+\\"):
                    return None
                path += regex.strip("^$")
        return path


def walk(resolver=None, parts=(), namespace=""):
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            ns = ":".join(filter(None, [namespace, entry.namespace]))
            yield from walk(entry, parts + (entry,), ns)
        elif isinstance(entry, URLPattern):
            yield Route(parts + (entry,), entry.name, namespace, entry.callback)
