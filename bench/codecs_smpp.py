"""SMPP codec benchmark: submit_sm with USSD TLVs, encode + decode, ours vs smpplib.

Both codecs run in the same process, alternating in short rounds so that CPU
frequency drift hits both alike. One operation = encode a prepared PDU object to
bytes + decode those bytes back to a PDU object. Run: python -m bench.codecs_smpp
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from extrabalance.smpp.pdu import ItsSessionInfo, SubmitSm, Tag, decode, encode, tlv_u8

ROUNDS = 6
MENU = b"1. Borrow 5 EGP\n2. Borrow 10 EGP\n3. Borrow 20 EGP\n4. My balance"


def _ours() -> tuple[Callable[[], object], bytes]:
    pdu = SubmitSm(
        service_type="USSD", source_addr_ton=0, source_addr_npi=1, source_addr="123",
        dest_addr_ton=1, dest_addr_npi=1, destination_addr="201001234567",
        data_coding=0x0F, short_message=MENU, sequence_number=42,
        tlvs=(ItsSessionInfo(17, 1).as_tlv(), tlv_u8(Tag.USSD_SERVICE_OP, 2)),
    )

    def op() -> object:
        return decode(encode(pdu))

    return op, encode(pdu)


def _smpplib() -> tuple[Callable[[], object], bytes]:
    from smpplib import smpp

    class _Client:  # smpplib takes sequence numbers from a client object
        sequence = 42

        def next_sequence(self) -> int:
            return 42

    client = _Client()
    pdu = smpp.make_pdu(
        "submit_sm", client=client, service_type="USSD", source_addr_ton=0,
        source_addr_npi=1, source_addr="123", dest_addr_ton=1, dest_addr_npi=1,
        destination_addr="201001234567", esm_class=0, protocol_id=0, priority_flag=0,
        schedule_delivery_time="", validity_period="", registered_delivery=0,
        replace_if_present_flag=0, data_coding=0x0F, sm_default_msg_id=0,
        short_message=MENU, its_session_info=(17 << 8) | (1 << 1), ussd_service_op=2,
    )

    def op() -> object:
        return smpp.parse_pdu(pdu.generate(), client=client)

    return op, pdu.generate()


def _rate(op: Callable[[], object], seconds: float) -> tuple[int, float]:
    # CPU time of this process, not the wall clock: on a shared machine the other jobs'
    # load then falls on neither side of the comparison.
    n = 0
    batch = 64
    start = time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            op()
        n += batch
        now = time.process_time()
        if now >= deadline:
            return n, now - start


def run(seconds: float = 2.0) -> dict[str, float]:
    """Ops per second of both codecs over `seconds` in total, and their ratio."""
    ours, ours_wire = _ours()
    lib, lib_wire = _smpplib()
    if ours_wire != lib_wire:  # same work on both sides, or the figure means nothing
        raise AssertionError("the two codecs do not produce the same bytes")
    ours()
    lib()
    slice_s = seconds / (2 * ROUNDS)
    totals = {"ours": [0, 0.0], "lib": [0, 0.0]}
    for _ in range(ROUNDS):
        for name, op in (("ours", ours), ("lib", lib)):
            n, elapsed = _rate(op, slice_s)
            totals[name][0] += n
            totals[name][1] += elapsed
    ours_per_s = totals["ours"][0] / totals["ours"][1]
    lib_per_s = totals["lib"][0] / totals["lib"][1]
    return {
        "smpp_ours_per_s": round(ours_per_s),
        "smpp_smpplib_per_s": round(lib_per_s),
        "smpp_ratio": round(ours_per_s / lib_per_s, 2),
    }


if __name__ == "__main__":
    print(json.dumps(run()))
