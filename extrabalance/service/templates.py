"""Message templates per language: the only place where money becomes text.

Templates come from the `[templates.<lang>]` tables of the config. Parameters are
passed as integers (money in minor units) or strings; any parameter named in
`MONEY_PARAMS` is formatted with the node's currency (`5.00 EGP`). A refusal reason
code passed as `reason` is turned into the language's words from `[templates.<lang>.reasons]`.
A bundle passed as `bundle` (`data:524288000`: kind, then octets, seconds or SMS) is
turned into words by the language's `bundle_<kind>` template.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MONEY_PARAMS = frozenset(
    {"amount", "fee", "debt", "total", "recovered", "headroom", "ceiling", "balance", "limit"}
)


class TemplateError(KeyError):
    """A template or one of its parameters is missing."""


def format_minor(amount_minor: int, exponent: int) -> str:
    """`550, 2` → `5.50`; exact integer arithmetic, never a float."""
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**exponent)
    if exponent == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:0{exponent}d}"


def _units(quantity: int, per: int) -> str:
    """`quantity / per` for a screen: whole, or with one decimal (rounded down)."""
    whole, rest = divmod(quantity, per)
    if rest == 0:
        return str(whole)
    return f"{whole}.{rest * 10 // per}"


@dataclass(frozen=True, slots=True)
class Templates:
    tables: Mapping[str, Mapping[str, Any]]
    default_language: str
    currency_exponent: int

    def languages(self) -> tuple[str, ...]:
        return tuple(self.tables)

    def language(self, wanted: str | None) -> str:
        return wanted if wanted is not None and wanted in self.tables else self.default_language

    def money(self, amount_minor: int, language: str) -> str:
        table = self.tables[self.language(language)]
        symbol = table.get("currency_symbol", "")
        text = format_minor(amount_minor, self.currency_exponent)
        return f"{text} {symbol}".strip()

    def reason(self, code: str, language: str) -> str:
        reasons = self.tables[self.language(language)].get("reasons", {})
        return str(reasons.get(code, code))

    def bundle(self, kind: str, quantity: int, language: str) -> str:
        """A bundle in words: data in MB (2^20 octets), voice in minutes, SMS counted."""
        if kind == "data":
            return self.render("bundle_data", language, {"mb": _units(quantity, 1 << 20)})
        if kind == "voice":
            return self.render("bundle_voice", language, {"minutes": _units(quantity, 60)})
        return self.render("bundle_sms", language, {"count": quantity})

    def has(self, key: str, language: str) -> bool:
        return key in self.tables[self.language(language)]

    def render(self, key: str, language: str | None, params: Mapping[str, Any] | None = None) -> str:
        lang = self.language(language)
        try:
            template = self.tables[lang][key]
        except KeyError:
            raise TemplateError(f"no template {key!r} in language {lang!r}") from None
        values: dict[str, Any] = {}
        for name, value in (params or {}).items():
            if name in MONEY_PARAMS and isinstance(value, int):
                values[name] = self.money(value, lang)
            elif name == "reason" and isinstance(value, str):
                values[name] = self.reason(value, lang)
            elif name == "bundle" and isinstance(value, str) and ":" in value:
                kind, _, quantity = value.partition(":")
                values[name] = self.bundle(kind, int(quantity), lang)
            else:
                values[name] = value
        try:
            return str(template).format_map(values)
        except (KeyError, IndexError) as exc:
            raise TemplateError(f"template {lang}.{key} needs parameter {exc}") from None
