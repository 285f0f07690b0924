"""The node's admin side: the HTTP admin API and status page (`server`), its small
HTTP/1.1 layer (`http`) and the live rates it shows (`stats`). See docs/operations.md."""

from extrabalance.admin.server import ROUTES, AdminConfigError, AdminServer

__all__ = ["ROUTES", "AdminConfigError", "AdminServer"]
