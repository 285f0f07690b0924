"""The SMPP server role (SMSC / USSD gateway side), asyncio, for the bundled simulator.

What this file owns: accepting connections, checking bind credentials, handing each
submit_sm to the simulator, delivering deliver_sm to a bound receiver/transceiver
within its window, and throttling fault injection. The protocol lives in session.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from extrabalance.smpp.aio.connection import RequestFailedError, SmppConnection
from extrabalance.smpp.pdu import (
    CommandId,
    DataSm,
    DeliverSm,
    Pdu,
    Status,
    SubmitSm,
    make_response,
)
from extrabalance.smpp.session import Role, Session, State

__all__ = [
    "CONNECTIONS_MAX", "NoReceiverError", "OnSubmit", "RequestFailedError", "Smsc",
]

log = logging.getLogger(__name__)

CONNECTIONS_MAX = 64  # simultaneous ESME connections the simulator accepts
UNBIND_TIMEOUT_S = 2.0

# (pdu, system_id of the bind) -> (command_status, message_id), or an awaitable of
# it. A plain tuple is answered in the turn the submit_sm was read, without a task.
OnSubmit = Callable[[SubmitSm, str], tuple[int, str] | Awaitable[tuple[int, str]]]

_RECEIVER_STATES = frozenset((State.BOUND_RX, State.BOUND_TRX))
_REFUSALS = {
    CommandId.QUERY_SM: Status.ESME_RQUERYFAIL,
    CommandId.CANCEL_SM: Status.ESME_RCANCELFAIL,
    CommandId.REPLACE_SM: Status.ESME_RREPLACEFAIL,
}


class NoReceiverError(LookupError):
    """deliver() found no bound receiver/transceiver (for that system_id)."""


class Smsc:
    """An SMSC / USSD gateway endpoint.

    `credentials` maps system_id -> password (None accepts any bind). Wrong system_id
    is refused with ESME_RINVSYSID, wrong password with ESME_RINVPASWD.
    `on_submit(pdu, system_id)` returns (status, message_id) for submit_sm (and
    data_sm), directly or as an awaitable; if it raises, the ESME gets
    ESME_RX_T_APPN.
    """

    def __init__(
        self,
        *,
        credentials: dict[str, str] | None,
        on_submit: OnSubmit,
        system_id: str = "SMSC",
        window_max: int = 10,
        enquire_link_s: float = 30.0,
        enquire_link_periodic: bool = False,
        response_timeout_s: float = 5.0,
        connections_max: int = CONNECTIONS_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials
        self.on_submit = on_submit
        self.system_id = system_id
        self.window_max = window_max
        self.enquire_link_s = enquire_link_s
        self.enquire_link_periodic = enquire_link_periodic
        self.response_timeout_s = response_timeout_s
        self.connections_max = connections_max
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._conns: set[SmppConnection] = set()
        self._throttle_fraction: float | None = None
        self._throttle_acc = 0.0
        self._rr = itertools.count()
        self.submits_received = 0
        self.submits_throttled = 0

    # -- configuration -----------------------------------------------------------------

    def set_throttle(self, fraction_or_none: float | None) -> None:
        """Answer this share (0..1) of submits with ESME_RTHROTTLED; None stops it.
        Deterministic: 0.5 throttles every second submit."""
        if fraction_or_none is not None and not 0.0 <= fraction_or_none <= 1.0:
            raise ValueError("throttle fraction must be within 0..1")
        self._throttle_fraction = fraction_or_none
        self._throttle_acc = 0.0

    def _authenticate(self, pdu: Pdu) -> int:
        if self.credentials is None:
            return Status.ESME_ROK
        system_id = getattr(pdu, "system_id", "")
        if system_id not in self.credentials:
            return Status.ESME_RINVSYSID
        if self.credentials[system_id] != getattr(pdu, "password", ""):
            return Status.ESME_RINVPASWD
        return Status.ESME_ROK

    # -- lifecycle ---------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        """Start accepting; returns the bound port (pass 0 for a free one)."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _SmscConnection(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.unbind(UNBIND_TIMEOUT_S) for c in list(self._conns)),
                             return_exceptions=True)
        conns = list(self._conns)
        for c in conns:
            c.close()
        if conns:  # connection_lost comes a loop turn later: wait for every end
            await asyncio.wait([asyncio.ensure_future(c.closed.wait()) for c in conns],
                               timeout=UNBIND_TIMEOUT_S)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def bound_system_ids(self) -> list[str]:
        return [c.session.peer_system_id for c in self._conns if c.session.bound]

    def receivers(self, system_id: str | None = None) -> list[SmppConnection]:
        """The binds that can take a deliver_sm now (of `system_id` if given)."""
        return [
            c for c in self._conns
            if c.session.state in _RECEIVER_STATES
            and (system_id is None or c.session.peer_system_id == system_id)
        ]

    # -- delivering --------------------------------------------------------------------

    async def deliver(self, pdu: DeliverSm, system_id: str | None = None, *,
                      connection: SmppConnection | None = None) -> int:
        """Send deliver_sm to a bound receiver/transceiver (`connection` if given, else
        one of `system_id`'s, else any, round-robin) and return the deliver_sm_resp
        status. The bind's window is honoured (waits for a slot). Raises
        NoReceiverError when nobody can take it (or `connection` is no longer
        bound), RequestFailedError on timeout or connection loss."""
        if connection is not None:  # the dialog's bind: no list of the others
            if (connection not in self._conns
                    or connection.session.state not in _RECEIVER_STATES
                    or (system_id is not None
                        and connection.session.peer_system_id != system_id)):
                raise NoReceiverError("that bind is gone")
            conn = connection
        else:
            candidates = self.receivers(system_id)
            if not candidates:
                raise NoReceiverError(
                    f"no receiver bound{f' as {system_id}' if system_id else ''}")
            conn = candidates[next(self._rr) % len(candidates)]
        resp = await conn.request(pdu)
        return resp.command_status

    # -- connections -------------------------------------------------------------------

    def _on_request(self, conn: SmppConnection, pdu: Pdu) -> Pdu | Awaitable[Pdu]:
        if isinstance(pdu, (SubmitSm, DataSm)):
            self.submits_received += 1
            if self._throttled():
                self.submits_throttled += 1
                return make_response(pdu, Status.ESME_RTHROTTLED)
            outcome = self.on_submit(pdu, conn.session.peer_system_id)  # type: ignore[arg-type]
            if isinstance(outcome, tuple):
                return _submit_resp(pdu, *outcome)
            return self._submit_resp_later(pdu, outcome)
        return make_response(pdu, _REFUSALS.get(CommandId(pdu.command_id), Status.ESME_RINVCMDID))

    @staticmethod
    async def _submit_resp_later(pdu: Pdu, outcome: Awaitable[tuple[int, str]]) -> Pdu:
        return _submit_resp(pdu, *await outcome)

    def _throttled(self) -> bool:
        if not self._throttle_fraction:
            return False
        self._throttle_acc += self._throttle_fraction
        if self._throttle_acc >= 1.0 - 1e-9:
            self._throttle_acc -= 1.0
            return True
        return False


class _SmscConnection(SmppConnection):
    """A connection an ESME dialled: one Session in the SMSC role, counted in the
    Smsc's connections from connection_made until it ends."""

    def __init__(self, smsc: Smsc) -> None:
        session = Session(
            Role.SMSC, system_id=smsc.system_id, authenticator=smsc._authenticate,
            window_max=smsc.window_max, enquire_link_s=smsc.enquire_link_s,
            enquire_link_periodic=smsc.enquire_link_periodic,
            response_timeout_s=smsc.response_timeout_s,
        )
        super().__init__(session, self._on_pdu, name="smsc", clock=smsc._clock)
        self._smsc = smsc

    def _on_pdu(self, pdu: Pdu) -> Pdu | Awaitable[Pdu]:
        return self._smsc._on_request(self, pdu)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        smsc = self._smsc
        if len(smsc._conns) >= smsc.connections_max:
            transport.close()  # refused: never counted, never started
            return
        self.name = f"smsc<-{transport.get_extra_info('peername')}"
        smsc._conns.add(self)
        super().connection_made(transport)

    def _finish(self) -> None:
        super()._finish()
        self._smsc._conns.discard(self)


def _submit_resp(pdu: Pdu, status: int, message_id: str) -> Pdu:
    if status != Status.ESME_ROK:
        return make_response(pdu, status)
    return make_response(pdu, 0, message_id=message_id)
