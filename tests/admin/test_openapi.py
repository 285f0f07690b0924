"""docs/openapi.json and the server's route table describe the same API."""

from __future__ import annotations

import json
from pathlib import Path

from extrabalance.admin import ROUTES
from extrabalance.admin.server import ADMIN, PUBLIC, AdminServer

SPEC = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


def spec_routes() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in SPEC["paths"].items()
            for method in ops if method in HTTP_METHODS}


def test_every_route_is_in_the_spec_and_vice_versa():
    served = {(r.method, r.template) for r in ROUTES}
    assert served == spec_routes()


def test_every_route_has_a_handler():
    for route in ROUTES:
        assert callable(getattr(AdminServer, "h_" + route.handler, None)), route


def test_public_routes_are_marked_without_security_and_admin_ones_with():
    for route in ROUTES:
        op = SPEC["paths"][route.template][route.method.lower()]
        if route.access == PUBLIC:
            assert op.get("security") == [], route
        else:
            assert "security" not in op, route  # inherits the global bearer scheme
            assert "401" in op["responses"], route
        if route.access == ADMIN:
            assert "403" in op["responses"], route


def test_refs_resolve():
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    parts = value.removeprefix("#/").split("/")
                    target = SPEC
                    for p in parts:
                        target = target[p]
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(SPEC)
