"""Recognizers that validate, not just match: a regex finds candidates, a real validator keeps them.

Checksums come from `python-stdnum` (IBAN mod-97, DNI/NIE check letter, CIF control digit,
Luhn) and phone numbers from `phonenumbers` (Google's libphonenumber metadata), so a string
with the right shape and a wrong check digit is not redacted. Entity names are Presidio's
where Presidio has one (EMAIL_ADDRESS, PHONE_NUMBER, IBAN_CODE, ...).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn
from stdnum.es import cif, dni, nie

Validator = Callable[[str], bool]


@dataclass(frozen=True)
class Span:
    """One detected value: `text[start:end]` is an entity of `entity_type`."""

    start: int
    end: int
    entity_type: str


@dataclass(frozen=True)
class Recognizer:
    """A candidate regex (group `value` or the whole match) and a validator of candidates."""

    entity_type: str
    pattern: re.Pattern[str]
    validate: Validator
    priority: int  # on overlapping spans the higher priority wins (checksums beat shapes)
    # Cheap pre-checks: the text must contain one of `hint` (or match `hint_pattern`) for the
    # pattern to be run at all (an e-mail needs an @).
    hint: str | tuple[str, ...] = ()
    hint_pattern: re.Pattern[str] | None = None
    # The match may start later than the value: it is extended left over these characters
    # (an e-mail is found from its @, which is rare, instead of from every word).
    extend_left: frozenset[str] = frozenset()

    def find(self, text: str, taken: list[Span] = ()) -> list[Span]:
        """Validated spans; candidates overlapping `taken` (a stronger type's) are not validated."""
        if self.hint:
            hints = (self.hint,) if isinstance(self.hint, str) else self.hint
            if not any(h in text for h in hints) and not (
                self.hint_pattern is not None and self.hint_pattern.search(text)
            ):
                return []
        spans = []
        group = "value" if "value" in self.pattern.groupindex else 0
        for m in self.pattern.finditer(text):
            start, end = m.start(group), m.end(group)
            while start > 0 and text[start - 1] in self.extend_left:
                start -= 1
            if start == end or any(start < t.end and t.start < end for t in taken):
                continue
            if self.validate(text[start:end]):
                spans.append(Span(start, end, self.entity_type))
        return spans


def _compact(value: str) -> str:
    return re.sub(r"[\s./-]", "", value).upper()


def valid_iban(value: str) -> bool:
    return iban.is_valid(_compact(value))


def valid_card(value: str) -> bool:
    digits = _compact(value)
    # Issuer prefixes of the networks in use (Amex 34/37, Visa 4, Mastercard 2/5, Discover 6,
    # Diners 30/36/38, JCB 35); a bare Luhn check alone passes one random number in ten.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn.is_valid(digits)


def valid_es_nif(value: str) -> bool:
    return dni.is_valid(_compact(value))


def valid_es_nie(value: str) -> bool:
    return nie.is_valid(_compact(value))


def valid_es_cif(value: str) -> bool:
    return cif.is_valid(_compact(value))


def valid_es_nss(value: str) -> bool:
    """Spanish social-security number: 2-digit province, 7-8 digit number, 2 mod-97 check digits."""
    digits = re.sub(r"\D", "", value)
    if len(digits) != 12:
        return False
    province, number, check = int(digits[:2]), int(digits[2:10]), int(digits[10:])
    if not 1 <= province <= 99:
        return False
    # Numbers below 10^7 are written without the leading zero when the check is computed.
    base = province * 10**7 + number if number < 10**7 else int(digits[:10])
    return base % 97 == check


def valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_PHONE_REGIONS = ("ES", "US", "GB")  # national formats tried in this order


_DOTTED_QUAD = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def valid_phone(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    international = value.startswith(("+", "00"))
    # National numbers have at most 11 digits (ES 9, US 10, GB 11); a dotted quad is an address.
    if not 7 <= len(digits) <= (15 if international else 11) or _DOTTED_QUAD.match(value):
        return False
    regions = (None,) if international else _PHONE_REGIONS
    for region in regions:
        try:
            number = phonenumbers.parse(
                "+" + value.lstrip("+")[2:] if value.startswith("00") else value, region
            )
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


def valid_email(value: str) -> bool:
    local, _, domain = value.rpartition("@")
    return bool(local) and "." in domain and ".." not in domain and not domain.startswith(".")


def valid_url(value: str) -> bool:
    return "." in value.split("//", 1)[-1].split("/", 1)[0]


def always(value: str) -> bool:
    return True


# Validators a config's custom recognizer may name (no code in the config).
VALIDATORS: dict[str, Validator] = {
    "none": always,
    "luhn": lambda v: luhn.is_valid(re.sub(r"\D", "", v)) if re.sub(r"\D", "", v) else False,
    "iban": valid_iban,
    "mod97": lambda v: bool(re.sub(r"\D", "", v)) and int(re.sub(r"\D", "", v)) % 97 == 1,
    "es_nif": valid_es_nif,
    "es_nie": valid_es_nie,
    "es_cif": valid_es_cif,
}

# Every pattern starts with a character class and checks the character before its match in a
# lookbehind placed *after* that first character: re then skips impossible start positions in
# C (its first-character prefilter), which makes each scan 2-3x faster than a leading
# lookbehind. `(?<![\w@]\d)` right after a `\d` means "not glued to a preceding word".
_E = r"(?![\w@])"
_CIF_LETTERS = "ABCDEFGHJNPQRSUVWabcdefghjnpqrsuvw"

_BUILTIN = (
    Recognizer(
        "EMAIL_ADDRESS",
        re.compile(r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        valid_email,
        60,
        hint="@",
        extend_left=frozenset(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
        ),
    ),
    Recognizer(
        "URL",
        re.compile(r"\b(?:https?://|www\.)[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]]"),
        valid_url,
        50,
        hint=("http", "www."),
    ),
    Recognizer(
        "IBAN_CODE",
        re.compile(
            r"[A-Z](?<![\w@][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?" + _E
        ),
        valid_iban,
        90,
    ),
    # A whole digit run only: the first 16 digits of a (broken) IBAN are not a card.
    Recognizer(
        "CREDIT_CARD",
        re.compile(r"\d(?<![\w@]\d)(?<!\d[ -]\d)(?:[ -]?\d){12,18}(?![ -]?\d)" + _E),
        valid_card,
        85,
    ),
    Recognizer("ES_NIF", re.compile(r"\d(?<![\w@]\d)\d{7}[ -]?[A-Za-z]" + _E), valid_es_nif, 80),
    Recognizer(
        "ES_NIE",
        re.compile(r"[XYZxyz](?<![\w@][XYZxyz])[ -]?\d{7}[ -]?[A-Za-z]" + _E),
        valid_es_nie,
        80,
    ),
    Recognizer(
        "ES_CIF",
        re.compile(
            f"[{_CIF_LETTERS}](?<![\\w@][{_CIF_LETTERS}])" + r"[ -]?\d{7}[ -]?[0-9A-Ja-j]" + _E
        ),
        valid_es_cif,
        80,
    ),
    Recognizer(
        "ES_NSS",
        re.compile(r"\d(?<![\w@]\d)(?<!\d[ /-]\d)\d[ /-]?\d{8}[ /-]?\d{2}(?![ /-]?\d)" + _E),
        valid_es_nss,
        75,
    ),
    Recognizer(
        "IP_ADDRESS",
        re.compile(r"\d(?<![\w.:]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w:]|\.\d)"),
        valid_ip,
        70,
        hint=".",
    ),
    Recognizer(
        "IP_ADDRESS",
        re.compile(
            r"[0-9A-Fa-f:](?<![\w.:][0-9A-Fa-f:])"
            r"(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{1,38}(?<!:)(?![\w:]|\.\d)"
        ),
        valid_ip,
        70,
        hint="::",
        hint_pattern=re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{1,4}:"),
    ),
    Recognizer(
        "PHONE_NUMBER",
        re.compile(
            r"(?:\+(?<![\w+]\+)\(?\d|\((?<![\w+]\()\d|\d(?<![\w+]\d))[\d ().-]{5,17}\d" + _E
        ),
        valid_phone,
        40,
    ),
    # Passport numbers carry no public check digit: only a number right after the word counts.
    Recognizer(
        "PASSPORT",
        re.compile(
            r"(?i:passport|pasaporte)(?:\s+(?i:number|no\.?|n[º°o]\.?|n[úu]mero|nr\.?))?\s*[:#]?\s*"
            r"(?P<value>(?=[A-Z0-9]*\d)[A-Z]{0,3}[A-Z0-9]{5,9})" + _E
        ),
        always,
        65,
        hint=("pass", "Pass", "PASS", "pasap", "Pasap", "PASAP"),
    ),
)

ENTITY_TYPES = tuple(dict.fromkeys(r.entity_type for r in _BUILTIN)) + (
    "PERSON",
    "LOCATION",
    "ORGANIZATION",
)
CHECKSUM_TYPES = ("IBAN_CODE", "CREDIT_CARD", "ES_NIF", "ES_NIE", "ES_CIF", "ES_NSS")


def builtin_recognizers(entities: tuple[str, ...] | None = None) -> list[Recognizer]:
    """The built-in recognizers, all or those of `entities`."""
    return [r for r in _BUILTIN if entities is None or r.entity_type in entities]


def custom_recognizer(name: str, pattern: str, validator: str, priority: int = 95) -> Recognizer:
    """A recognizer from the config: `pattern` (group `value` optional) checked by `validator`."""
    return Recognizer(name, re.compile(pattern), VALIDATORS[validator], priority)
