import pytest

from extrabalance.config import load_settings
from extrabalance.service.templates import TemplateError, Templates, format_minor


def test_format_minor_exact():
    assert format_minor(550, 2) == "5.50"
    assert format_minor(5, 2) == "0.05"
    assert format_minor(-1234, 2) == "-12.34"
    assert format_minor(7, 0) == "7"
    assert format_minor(1000, 3) == "1.000"


def test_render_money_and_reason_in_both_languages():
    s = load_settings()
    t = Templates(s.templates, "en", 2)
    assert t.render("loan_refused", "en", {"reason": "CEILING_REACHED"}) == (
        "Extra Balance not granted: this would pass your limit; repay first"
    )
    assert t.render("payback_partial", "ar", {"recovered": 300, "debt": 250}) == (
        "شكرا. خصمنا 3.00 ج.م من شحنتك لسداد الرصيد الإضافي. المتبقي: 2.50 ج.م."
    )
    assert t.language("fr") == "en"


def test_every_reason_has_words_in_every_language():
    from extrabalance.core.reasons import Reason

    s = load_settings()
    for lang, table in s.templates.items():
        for reason in Reason:
            assert reason.value in table["reasons"], (lang, reason)


def test_missing_parameter_is_a_clear_error():
    t = Templates({"en": {"x": "owe {debt}"}}, "en", 2)
    with pytest.raises(TemplateError, match="needs parameter"):
        t.render("x", "en", {})
    with pytest.raises(TemplateError, match="no template"):
        t.render("nope", "en")


def test_bundles_in_words_in_both_languages():
    from extrabalance.config import load_settings
    from extrabalance.service.templates import Templates

    t = Templates(load_settings().templates, "en", 2)
    assert t.render("menu_item_bundle", "en", {
        "option": 13, "amount": 1000, "bundle": "data:524288000"}) == "13 500 MB data 10.00 EGP"
    assert t.bundle("data", 1_572_864, "en") == "1.5 MB data"
    assert t.bundle("voice", 1800, "ar") == "30 دقيقة مكالمات"
    assert t.bundle("sms", 100, "en") == "100 SMS"
