import pytest

from extrabalance.service.keywords import Command, parse_keyword


@pytest.mark.parametrize(
    "text, command, language, amount",
    [
        ("LOAN", Command.LOAN, "en", None),
        ("loan 10", Command.LOAN, "en", 10),
        ("  Loan    5  ", Command.LOAN, "en", 5),
        ("LOAN10", Command.LOAN, "en", 10),
        ("loan 5 egp", Command.LOAN, "en", 5),
        ("BAL", Command.BALANCE, "en", None),
        ("Balance", Command.BALANCE, "en", None),
        ("help", Command.HELP, "en", None),
        ("STOP ADS", Command.STOP_ADS, "en", None),
        ("stop   ads", Command.STOP_ADS, "en", None),
        ("START ADS", Command.START_ADS, "en", None),
        ("سلفة", Command.LOAN, "ar", None),
        ("سلفه ١٠", Command.LOAN, "ar", 10),
        ("سلفة 5", Command.LOAN, "ar", 5),
        ("رصيد", Command.BALANCE, "ar", None),
        ("مساعدة", Command.HELP, "ar", None),
        ("إيقاف العروض", Command.STOP_ADS, "ar", None),
        ("تشغيل العروض", Command.START_ADS, "ar", None),
        ("hello there", Command.UNKNOWN, "en", None),
        ("مرحبا", Command.UNKNOWN, "ar", None),
        ("", Command.UNKNOWN, "en", None),
        ("balx", Command.UNKNOWN, "en", None),
    ],
)
def test_keywords(text, command, language, amount):
    kw = parse_keyword(text)
    assert (kw.command, kw.language, kw.amount_major) == (command, language, amount)


def test_loan_with_words_keeps_them_for_the_reply():
    kw = parse_keyword("loan lots")
    assert kw.command is Command.LOAN and kw.amount_major is None and kw.amount_text == "lots"


def test_bal_with_trailing_words_is_not_balance():
    assert parse_keyword("bal please now").command is Command.UNKNOWN


def test_yes_in_both_languages_is_a_confirmation():
    from extrabalance.service.keywords import Command, parse_keyword

    for text, lang in (("YES", "en"), (" y ", "en"), ("Confirm", "en"), ("نعم", "ar"),
                       ("موافق", "ar"), ("تأكيد", "ar")):
        kw = parse_keyword(text)
        assert (kw.command, kw.language) == (Command.CONFIRM, lang), text
    assert parse_keyword("YES PLEASE").command is Command.UNKNOWN


def test_data_in_both_languages_asks_for_a_data_bundle():
    from extrabalance.service.keywords import Command, parse_keyword

    for text, lang in (("DATA", "en"), ("internet", "en"), ("باقة", "ar"), ("إنترنت", "ar"),
                       ("نت", "ar")):
        kw = parse_keyword(text)
        assert (kw.command, kw.language) == (Command.DATA, lang), text
