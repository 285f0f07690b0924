"""What the admin API needs of the node it serves, as small protocols.

The admin server reads live state (peers, binds, the MQTT session, the EDR writer,
metrics), reads the ledger through its read models, and changes subscribers through
the account service under the same per-subscriber lock as the traffic. It depends on
these protocols, not on the node module, so `node.py` imports the admin package and
nothing imports back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from extrabalance.config import Settings
    from extrabalance.ledger.factory import NodeLedger
    from extrabalance.observability import Metrics
    from extrabalance.service.accounts import AccountService
    from extrabalance.service.lending import LendingService
    from extrabalance.service.routing import Router


class PeerTable(Protocol):
    """The Diameter peers (`diameter.aio.node.DiameterNode`)."""

    def peer_states(self) -> list[dict[str, Any]]: ...

    def peer_warnings(self) -> dict[tuple[str, str], int]: ...


class BindTable(Protocol):
    """The SMPP binds (`smpp.aio.client.Esme`)."""

    def bind_states(self) -> list[dict[str, object]]: ...


class Session(Protocol):
    """A subscription's state (`recharge.listener.RechargeListener`)."""

    def stats(self) -> dict[str, int | float | bool]: ...


class Health(Protocol):
    """A component that reports its own health (`observability.EdrWriter`)."""

    def health(self) -> dict[str, Any]: ...


class AdminNode(Protocol):
    """The running node as the admin API sees it (`node.Node` is one)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def ledger(self) -> NodeLedger: ...

    @property
    def diameter(self) -> PeerTable: ...

    @property
    def esme(self) -> BindTable: ...

    @property
    def recharges(self) -> Session: ...

    @property
    def edr(self) -> Health: ...

    @property
    def background_errors(self) -> dict[str, str]: ...

    @property
    def lending(self) -> LendingService: ...

    @property
    def router(self) -> Router: ...

    @property
    def accounts(self) -> AccountService: ...

    def gateway_events(self) -> dict[str, int]:
        """What the SMPP gateways did that a clean peer does not (eb_smpp_gateway_events)."""
        ...

    def undelivered_advances(self) -> dict[str, int]:
        """Advances whose granting CCA never reached the IN (eb_advance_answers_undelivered)."""
        ...

    def reload(self, settings: Settings) -> dict[str, Any]:
        """Apply a new, already validated config (see `Node.reload`)."""
        ...
