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
from dataclasses import dataclass, field
from typing import Any

MONEY_PARAMS = frozenset(
    {"amount", "fee", "debt", "total", "recovered", "headroom", "ceiling", "balance", "limit"}
)
# Rendered texts kept per (template, language, parameters): a loan's screens and SMS
# repeat a handful of amounts (the tiers, their fees, the debts they leave), so nearly
# every render is a dictionary lookup. Past this many the cache starts over.
RENDERED_MAX = 4096


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
    _rendered: dict[tuple[Any, ...], str] = field(
        default_factory=dict, init=False, repr=False, compare=False)

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
            return self._render("bundle_data", language, {"mb": _units(quantity, 1 << 20)})
        if kind == "voice":
            return self._render("bundle_voice", language, {"minutes": _units(quantity, 60)})
        return self._render("bundle_sms", language, {"count": quantity})

    def has(self, key: str, language: str) -> bool:
        return key in self.tables[self.language(language)]

    def render(self, key: str, language: str | None, params: Mapping[str, Any] | None = None) -> str:
        """`key` in `language` with `params` (kept: the tables never change in place; a
        reload builds new `Templates`)."""
        cache_key = (key, language, *params.items()) if params else (key, language)
        try:
            return self._rendered[cache_key]
        except KeyError:
            pass
        except TypeError:  # a parameter that cannot be a key (never on the hot path)
            return self._render(key, language, params)
        text = self._render(key, language, params)
        if len(self._rendered) >= RENDERED_MAX:
            self._rendered.clear()
        self._rendered[cache_key] = text
        return text

    def _render(self, key: str, language: str | None, params: Mapping[str, Any] | None) -> str:
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
