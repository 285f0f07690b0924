"""Which IN node owns a subscriber: learned routes (from his own traffic) win over the
static prefix/range table from config."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from extrabalance.service.ports import InAction, InOperation, InOutcome, InPort

LEARNED_CACHE_MAX = 200_000  # learned routes kept in memory; the ledger keeps them all


@dataclass(frozen=True, slots=True)
class RouteRule:
    """`prefix` matches MSISDNs starting with it; `start`..`end` (inclusive, same
    length as the MSISDN) match a numeric range. A rule with neither matches all."""

    in_node: str
    prefix: str | None = None
    start: str | None = None
    end: str | None = None

    def matches(self, msisdn: str) -> bool:
        if self.prefix is not None and not msisdn.startswith(self.prefix):
            return False
        if self.start is not None and (len(msisdn) != len(self.start) or msisdn < self.start):
            return False
        return not (self.end is not None and (len(msisdn) != len(self.end) or msisdn > self.end))


class Router:
    def __init__(
        self,
        static: Sequence[RouteRule],
        learned: Callable[[str], str | None] = lambda msisdn: None,
        *,
        learned_cache_max: int = LEARNED_CACHE_MAX,
    ) -> None:
        self.static = list(static)
        self._learned_lookup = learned
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.learned_cache_max = learned_cache_max

    def static_route(self, msisdn: str) -> str | None:
        for rule in self.static:
            if rule.matches(msisdn):
                return rule.in_node
        return None

    def route(self, msisdn: str) -> str | None:
        node = self._cache.get(msisdn)
        if node is not None:
            self._cache.move_to_end(msisdn)
            return node
        node = self._learned_lookup(msisdn)
        if node is not None:
            self._remember(msisdn, node)
            return node
        return self.static_route(msisdn)

    def learn(self, msisdn: str, in_node: str) -> None:
        """Remember a route seen in traffic (the service also persists it in the ledger)."""
        self._remember(msisdn, in_node)

    def _remember(self, msisdn: str, in_node: str) -> None:
        self._cache[msisdn] = in_node
        self._cache.move_to_end(msisdn)
        while len(self._cache) > self.learned_cache_max:
            self._cache.popitem(last=False)


PROBE_NODES_MAX = 16  # IN nodes asked at most for one unknown subscriber


class RouteProber:
    """Finds the home IN of a subscriber no route knows (docs/protocols.md, dynamic routing):
    asks each candidate IN node with CHECK_BALANCE and keeps the first that knows him
    (does not answer 5030). CHECK_BALANCE moves no money, so probing is safe to repeat.
    """

    def __init__(self, in_port: InPort, in_nodes: Sequence[str]) -> None:
        self.in_port = in_port
        self.in_nodes = list(in_nodes)[:PROBE_NODES_MAX]
        self.stats = {"probes": 0, "found": 0, "not_found": 0}

    async def probe(self, msisdn: str) -> str | None:
        self.stats["probes"] += 1
        for in_node in self.in_nodes:
            op = InOperation(InAction.CHECK_BALANCE, msisdn, in_node, 1,
                             self.in_port.new_session_id())
            result = await self.in_port.execute(op)
            if result.outcome is InOutcome.DONE:
                self.stats["found"] += 1
                return in_node
        self.stats["not_found"] += 1
        return None
