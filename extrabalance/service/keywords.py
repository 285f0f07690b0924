"""SMS keywords: what a subscriber may text to the short code, in English and Arabic.

Parsing is tolerant: case, extra spaces, Arabic-Indic digits, Arabic letter variants
(أ إ آ → ا, ة → ه, ى → ي) and tatweel are folded before matching. The language of the
keyword is returned so the reply can be written in it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import Enum


class Command(Enum):
    LOAN = "loan"
    BALANCE = "balance"
    HELP = "help"
    STOP_ADS = "stop_ads"
    START_ADS = "start_ads"
    CONFIRM = "confirm"  # YES: completes an SMS loan's confirmation or an opt-in
    DATA = "data"  # the largest data bundle that fits (bundle tiers configured)
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Keyword:
    command: Command
    language: str  # "en" or "ar"
    amount_major: int | None = None  # `LOAN 10` → 10 (whole currency units)
    amount_text: str | None = None  # what followed the keyword, when it was not a number


_DIGITS = str.maketrans("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹", "01234567890123456789")


def ascii_digits(text: str) -> str:
    """Arabic-Indic (٠-٩) and Eastern Arabic-Indic (۰-۹) digits as ASCII digits."""
    return text.translate(_DIGITS)


_ARABIC_FOLD = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ة": "ه", "ى": "ي", "ـ": None})

# (words, command, language); words are compared after folding.
_VOCABULARY: tuple[tuple[tuple[str, ...], Command, str], ...] = (
    (("loan", "borrow", "eb", "extra"), Command.LOAN, "en"),
    (("bal", "balance", "debt"), Command.BALANCE, "en"),
    (("help", "?", "info"), Command.HELP, "en"),
    (("stop ads", "stop", "stopads", "unsub"), Command.STOP_ADS, "en"),
    (("start ads", "start", "startads"), Command.START_ADS, "en"),
    (("yes", "y", "confirm"), Command.CONFIRM, "en"),
    (("data", "internet", "bundle"), Command.DATA, "en"),
    (("سلفه", "سلف", "قرض", "رصيد اضافي"), Command.LOAN, "ar"),
    (("رصيد", "دين", "مديونيه"), Command.BALANCE, "ar"),
    (("مساعده", "مساعدة"), Command.HELP, "ar"),
    (("ايقاف العروض", "ايقاف", "الغاء"), Command.STOP_ADS, "ar"),
    (("تشغيل العروض", "تشغيل"), Command.START_ADS, "ar"),
    (("نعم", "موافق", "تاكيد"), Command.CONFIRM, "ar"),
    (("باقه", "انترنت", "بيانات", "نت"), Command.DATA, "ar"),
)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_DIGITS).translate(_ARABIC_FOLD)
    return re.sub(r"\s+", " ", text).strip().lower()


def _is_arabic(text: str) -> bool:
    return any("\u0600" <= ch <= "\u06ff" for ch in text)


def parse_keyword(text: str) -> Keyword:
    """Turn an SMS body into a command; anything unrecognised is `UNKNOWN`."""
    folded = normalise(text)
    language = "ar" if _is_arabic(folded) else "en"
    if not folded:
        return Keyword(Command.UNKNOWN, language)
    # Longest phrase first so that "stop ads" wins over "stop", "رصيد اضافي" over "رصيد".
    candidates = sorted(
        ((word, cmd, lang) for words, cmd, lang in _VOCABULARY for word in words),
        key=lambda entry: -len(entry[0]),
    )
    for word, command, lang in candidates:
        if folded == word or folded.startswith(word + " ") or (
            command is Command.LOAN and re.fullmatch(re.escape(word) + r"\d+", folded)
        ):
            rest = folded[len(word):].strip()
            if command is not Command.LOAN:
                if rest:
                    continue
                return Keyword(command, lang)
            if not rest:
                return Keyword(Command.LOAN, lang)
            match = re.fullmatch(r"(\d{1,6})(?:\s*(?:egp|le|ج|جنيه|ج\.م))?", rest)
            if match:
                return Keyword(Command.LOAN, lang, amount_major=int(match.group(1)))
            return Keyword(Command.LOAN, lang, amount_text=rest)
    return Keyword(Command.UNKNOWN, language)
