"""The demo's story over real sockets: every screen, SMS, result code and balance."""

from __future__ import annotations

import json
import subprocess
import sys

from extrabalance.demo import A, B, C, Transcript, demo_env, play


async def test_demo_story(tmp_path):
    transcript = Transcript()
    async with demo_env(tmp_path) as env:
        summary = await play(env, transcript)
        balances = {m: env.in_sim.balance(m) for m in (A, B, C)}
        edr_dir = env.node.edr.directory
    got = [(e.kind, e.msisdn, e.text, e.final, e.dialled, e.result_code)
           for e in transcript.entries if e.kind in ("screen", "sms", "diameter", "in_op")]
    # Limits from behaviour are on in the demo's config: everyone starts at 10.00, below
    # the segment ceilings (A and C: 25.00); the menu lists what fits, the data bundle too.
    menu_a = (
        "Extra Balance (owe 0.00 EGP, can borrow 10.00 EGP)\n1 1.00 EGP\n2 2.00 EGP\n"
        "3 3.00 EGP\n4 5.00 EGP\n13 500 MB data 5.00 EGP\n5 7.50 EGP\n0 My account"
    )
    # After a partial payback (-5 %) and a full one on time (+10 %): 10.50.
    account_a = ("Your limit: 10.50 EGP (starter limit)\nYou owe 0.00 EGP. You can borrow up to "
                 "10.50 EGP.\n1 Auto-advance: off\n2 Offers by SMS: on\n3 Language\n9 Back")
    menu_c = "رصيد إضافي (عليك 0.00 ج.م، متاح 10.00 ج.م)\n1 1.00 ج.م\n2 2.00 ج.م\n99 المزيد"
    account_c = "الدين 0.00 ج.م المتاح 10.00 ج.م\n1 تلقائي: {}\n2 العروض: مفعل\n3 English\n9 رجوع"
    on, off = "مفعل", "متوقف"
    confirm = "Borrow {}? Fee {} ({}). You repay {} from your next recharge.\n1 Confirm\n2 Cancel"
    # [eligibility].max_balance_to_borrow_minor (1.00) asked of the IN before each loan
    CHECK = "CCR CHECK_BALANCE 1.01 EGP on in-a: 2001 DIAMETER_SUCCESS"
    expected = [
        ("diameter", A, "CCA 4012 DIAMETER_CREDIT_LIMIT_REACHED", False, "", 4012),
        ("sms", A, "Out of credit? Dial *123# for Extra Balance now and pay later.", False, "", None),
        ("screen", A, menu_a, False, "*123#", None),
        ("screen", A, confirm.format("5.00 EGP", "0.50 EGP", "10%", "5.50 EGP"), False, "4", None),
        ("screen", A, "Done: 5.00 EGP added to your balance. You owe 5.50 EGP.", True, "1", None),
        ("in_op", A, CHECK, False, "", 2001),
        ("in_op", A, "CCR REFUND_ACCOUNT 5.00 EGP on in-a: 2001 DIAMETER_SUCCESS", False, "", 2001),
        ("sms", A, ("Extra Balance: 5.00 EGP added to your balance (fee 0.50 EGP). You owe 5.50 EGP;"
                   " it is repaid from your next recharge."), False, "", None),
        ("in_op", A, "CCR DIRECT_DEBITING 3.00 EGP on in-a: 2001 DIAMETER_SUCCESS", False, "", 2001),
        ("sms", A, ("Thank you. 3.00 EGP was deducted from your recharge to repay your Extra Balance."
                   " Remaining: 2.50 EGP."), False, "", None),
        ("in_op", A, "CCR DIRECT_DEBITING 2.50 EGP on in-a: 2001 DIAMETER_SUCCESS", False, "", 2001),
        ("sms", A, ("Thank you. 2.50 EGP was deducted from your recharge: your Extra Balance is fully"
                   " repaid. Dial *123# whenever you need it."), False, "", None),
        ("screen", A, account_a, False, "*123*0#", None),
        ("in_op", B, CHECK, False, "", 2001),
        ("in_op", B, "CCR REFUND_ACCOUNT 5.00 EGP on in-a: 2001 DIAMETER_SUCCESS", False, "", 2001),
        ("sms", B, ("Extra Balance: 5.00 EGP added to your balance (fee 0.50 EGP). You owe 5.50 EGP;"
                   " it is repaid from your next recharge."), False, "", None),
        ("screen", B, confirm.format("3.00 EGP", "0.35 EGP", "11.67%", "3.35 EGP"), False, "*123*3#", None),
        ("screen", B, "Done: 3.00 EGP added to your balance. You owe 8.85 EGP.", True, "1", None),
        ("in_op", B, CHECK, False, "", 2001),
        ("in_op", B, "CCR REFUND_ACCOUNT 3.00 EGP on in-a: 2001 DIAMETER_SUCCESS", False, "", 2001),
        ("sms", B, ("Extra Balance: 3.00 EGP added to your balance (fee 0.35 EGP). You owe 8.85 EGP;"
                   " it is repaid from your next recharge."), False, "", None),
        ("screen", B, "Sorry, no Extra Balance now: this would pass your limit; repay first",
         True, "*123*2#", None),
        ("screen", B, confirm.format("1.00 EGP", "0.15 EGP", "15%", "1.15 EGP"), False, "*123*1#", None),
        ("screen", B, "Done: 1.00 EGP added to your balance. You owe 10.00 EGP.", True, "1", None),
        ("in_op", B, CHECK, False, "", 2001),
        ("in_op", B, "CCR REFUND_ACCOUNT 1.00 EGP on in-a: 2001 DIAMETER_SUCCESS", False, "", 2001),
        ("sms", B, ("Extra Balance: 1.00 EGP added to your balance (fee 0.15 EGP). You owe 10.00 EGP;"
                   " it is repaid from your next recharge."), False, "", None),
        ("screen", B, "Sorry, no Extra Balance now: please repay your previous loans first",
         True, "*123#", None),
        ("diameter", B, "CCA 4010 DIAMETER_END_USER_SERVICE_DENIED", False, "", 4010),
        # C: Arabic screens; automatic advance turned on in "My account", then granted
        # inside the CCA and told by SMS in Arabic.
        ("screen", C, menu_c, False, "*123#", None),
        ("screen", C, account_c.format(off), False, "0", None),
        ("screen", C, account_c.format(on), False, "1", None),
        ("screen", C, menu_c, False, "9", None),
        ("diameter", C, "CCA 2001 DIAMETER_SUCCESS, granted 3.00 EGP", False, "", 2001),
        ("sms", C, "نفد رصيدك؟ أضفنا 3.00 ج.م رصيدا إضافيا (الرسوم 0.30 ج.م). عليك 3.30 ج.م.",
         False, "", None),
        # A texts DATA: 500 MB credited at the IN as units (MSCC), owed in money.
        ("in_op", A, CHECK, False, "", 2001),
        ("in_op", A, "CCR REFUND_ACCOUNT 500 MB data on in-a: 2001 DIAMETER_SUCCESS", False, "",
         2001),
        ("sms", A, ("Extra Balance: 500 MB data added to your line (price 5.00 EGP, fee 0.50 EGP)."
                   " You owe 5.50 EGP; it is repaid from your next recharge."), False, "", None),
    ]
    assert got == expected
    # Why A got 4012 and C an advance is said, not left to guess.
    notes = [e.text for e in transcript.entries if e.kind == "note"]
    assert any(A in e.msisdn and "not opted in" in e.text and "4012" in e.text
               for e in transcript.entries if e.kind == "note"), notes
    # A: lent 5.00 + 0.50 fee, recharged 3.00 (all taken) then 10.00 (2.50 taken).
    # B: three loans (9.00) spent as he went, nothing recharged. C: an advance of 3.00.
    # A then spent his 7.50 and took the data bundle: units at the IN, no money.
    assert balances == {A: 0, B: 0, C: 300}
    assert summary.loans == 6 and summary.bundle_loans == 1
    assert summary.principal_lent_minor == 2200
    assert summary.fees_minor == 230
    assert summary.recovered_minor == 550
    assert summary.outstanding_minor == 1880
    assert summary.in_credited_minor == 1700 and summary.in_debited_minor == 550
    assert summary.bundle_units_credited == {"data": 500 * 2**20}
    assert summary.ledger_matches_in and summary.journal_balanced
    # Every loan and payback also left an EDR line.
    lines = "".join(p.read_text() for p in sorted(edr_dir.glob("edr-*.csv")))
    assert lines.count(",loan,") == 5 and lines.count(",advance,") == 1
    assert lines.count(",payback,") == 2


def test_the_cca_is_printed_from_the_node_to_the_in(capsys):
    from extrabalance.demo import Entry, _print_entry

    _print_entry(Entry("diameter", A, "CCA 4012 DIAMETER_CREDIT_LIMIT_REACHED", result_code=4012))
    assert capsys.readouterr().out.strip() == "[node -> IN] CCA 4012 DIAMETER_CREDIT_LIMIT_REACHED"


def test_demo_command_json_summary():
    """`extrabalance demo --json` runs the same story in a fresh process and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "extrabalance", "demo", "--json"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["ledger_matches_in"] is True
    assert summary["journal_balanced"] is True
    assert summary["loans"] == 6 and summary["outstanding_minor"] == 1880
    assert summary["bundle_units_credited"] == {"data": 500 * 2**20}
