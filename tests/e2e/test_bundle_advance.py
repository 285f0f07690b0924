"""A data-bundle advance end to end over real sockets (node, IN and SMSC simulators,
MQTT broker): taken by USSD and by the SMS keyword DATA, credited at the IN as units in
a Multiple-Services-Credit-Control (the IN's data bucket grows, its money balance does
not), recovered in money from the next recharges, and the ledger matching the IN's
buckets and money exactly."""

from __future__ import annotations

from typing import Any

from extrabalance.config import load_settings
from extrabalance.demo import A, demo_env

MB = 2**20
BUNDLE = {"kind": "data", "quantity": 500 * MB, "service_identifier": 1, "rating_group": 10}
PRICE, FEE = 1000, 100  # 10.00 EGP, the regular segment's 10 %


def with_a_data_bundle() -> dict[str, Any]:
    """The shipped config plus tier 13: 500 MB of data for 10.00 EGP, offered to the
    `regular` segment (subscriber A)."""
    base = load_settings()
    tiers = [t.model_dump(exclude_none=True) for t in base.tiers]
    tiers.append({"id": 13, "amount_minor": PRICE, "bundle": BUNDLE})
    segments = [s.model_dump(mode="json") for s in base.segments]
    for seg in segments:
        if seg["name"] == "regular":
            seg["tiers"] = [*seg["tiers"], 13]
    # Limits from behaviour off (the demo turns them on): the segment ceiling applies.
    return {"tiers": tiers, "segments": segments, "limits": {"enabled": False}}


async def test_a_data_bundle_by_ussd_and_by_sms_is_credited_and_recovered(tmp_path):
    async with demo_env(tmp_path, with_a_data_bundle()) as env:
        in_sim, phone = env.in_sim, env.smsc.handset(A)
        in_sim.set_balance(A, 0)

        confirm = await phone.dial("*123*13#")
        assert confirm.text == ("Borrow 500 MB data for 10.00 EGP? Fee 1.00 EGP (10%). You repay "
                                "11.00 EGP from your next recharge.\n1 Confirm\n2 Cancel")
        done = await phone.reply("1")
        assert done.final and done.text == ("Done: 500 MB data added to your line. "
                                            "You owe 11.00 EGP.")
        assert (await phone.next_sms(5.0)).startswith(
            "Extra Balance: 500 MB data added to your line (price 10.00 EGP, fee 1.00 EGP).")
        assert in_sim.buckets(A) == {"data": 500 * MB} and in_sim.balance(A) == 0

        await in_sim.recharge(A, 1500)
        assert (await phone.next_sms(5.0)).startswith("Thank you. 11.00 EGP was deducted")
        assert in_sim.balance(A) == 400

        in_sim.spend(A)  # he has used his credit: under the 1.00 EGP to borrow again
        await phone.send_sms("DATA")
        assert (await phone.next_sms(5.0)).startswith("Extra Balance: 500 MB data added")
        assert in_sim.buckets(A) == {"data": 1000 * MB} and in_sim.balance(A) == 0
        await in_sim.recharge(A, 1100)
        assert (await phone.next_sms(5.0)).startswith("Thank you. 11.00 EGP was deducted")

        loans = await env.node.ledger.read(lambda c: c.execute(
            "SELECT tier_id, principal_minor, fee_minor, state, channel, bundle_kind,"
            " bundle_quantity, bundle_service_identifier, bundle_rating_group FROM loans"
            " WHERE msisdn = ? ORDER BY created_at", (A,)).fetchall())
        recovered = await env.node.ledger.read(lambda c: c.execute(
            "SELECT COALESCE(SUM(recovered_minor), 0) FROM recoveries WHERE msisdn = ?"
            " AND state = 'DONE'", (A,)).fetchone()[0])
        debt = await env.node.ledger.read(lambda c: c.debt_owed(A))

    # Each loan keeps the units it asked the IN for (what every re-send is built from).
    units = ("data", 500 * MB, 1, 10)
    assert [tuple(r) for r in loans] == [(13, PRICE, FEE, "REPAID", "ussd", *units),
                                         (13, PRICE, FEE, "REPAID", "sms", *units)]
    ops = [op for op in in_sim.applied() if op.msisdn == A]
    credits = [op for op in ops if op.action == "REFUND_ACCOUNT"]
    # The IN's bucket is exactly the ledger's bundle loans; no money was credited for them.
    assert [(op.bundle_kind, op.units, op.moved_minor, op.result_code) for op in credits] == [
        ("data", 500 * MB, 0, 2001)] * 2
    assert sum(op.units for op in credits) == sum(r[6] for r in loans)
    # Money: what the IN debited is what the ledger recovered: price and fee, both loans.
    debited = -sum(op.moved_minor for op in ops if op.action == "DIRECT_DEBITING")
    assert debited == recovered == 2 * (PRICE + FEE) and debt == 0
