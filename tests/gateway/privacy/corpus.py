"""A generated corpus of Spanish and English messages with labelled PII and near-misses.

Every labelled value is valid by its own standard (IBAN mod-97 and the Spanish CCC digits, Luhn
for cards, the DNI/NIE check letter, the CIF control character, the social-security mod-97
digits, phone numbers valid in their numbering plan). Every near-miss has the same shape with
one check digit wrong (or a shape no standard accepts) and must not be redacted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import phonenumbers
from stdnum import iban, luhn
from stdnum.es import ccc, cif

_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
_FIRST = [
    "Lucía",
    "Hugo",
    "Martina",
    "Mateo",
    "Paula",
    "Daniel",
    "Alice",
    "James",
    "Emma",
    "Oliver",
]
_LAST = ["García", "Martínez", "López", "Sánchez", "Pérez", "Smith", "Jones", "Taylor", "Brown"]
_DOMAINS = ["example.com", "correo.es", "empresa.org", "mail.example.co.uk", "universidad.edu"]


@dataclass
class Message:
    text: str
    lang: str
    labels: list[tuple[str, str]] = field(default_factory=list)  # (entity type, value as written)
    near_misses: list[tuple[str, str]] = field(default_factory=list)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _group(value: str, rng: random.Random, sep_choices: str = " -") -> str:
    style = rng.choice(["compact", "spaced"])
    if style == "compact":
        return value
    sep = rng.choice(sep_choices)
    return sep.join(value[i : i + 4] for i in range(0, len(value), 4))


def gen_iban(rng: random.Random, valid: bool) -> str:
    country = rng.choice(["ES", "ES", "DE", "GB"])
    if country == "ES":
        bank, branch, account = _digits(rng, 4), _digits(rng, 4), _digits(rng, 10)
        dc = ccc.calc_check_digits(bank + branch + "00" + account)
        bban = bank + branch + dc + account
    elif country == "DE":
        bban = _digits(rng, 18)
    else:
        bban = rng.choice(["NWBK", "BARC", "LOYD"]) + _digits(rng, 14)
    check = iban.calc_check_digits(country + "00" + bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 9)) % 97 + 2:02d}"[-2:]
        if iban.is_valid(country + check + bban):
            check = f"{(int(check) + 1) % 100:02d}"
    value = country + check + bban
    return (
        value if rng.random() < 0.5 else " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    )


def gen_card(rng: random.Random, valid: bool) -> str:
    kind = rng.choice(["visa", "mc", "amex"])
    if kind == "amex":
        body = rng.choice(["34", "37"]) + _digits(rng, 12)
    else:
        body = ("4" if kind == "visa" else "5" + rng.choice("12345")) + _digits(
            rng, 14 - (kind != "visa")
        )
    check = luhn.calc_check_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    return _group(body + check, rng)


def gen_dni(rng: random.Random, valid: bool) -> str:
    n = rng.randint(1_000_000, 99_999_999)
    letter = _DNI_LETTERS[n % 23]
    if not valid:
        letter = _DNI_LETTERS[(n + rng.randint(1, 22)) % 23]
    return f"{n:08d}" + rng.choice(["", "-"]) + letter


def gen_nie(rng: random.Random, valid: bool) -> str:
    prefix = rng.choice("XYZ")
    n = rng.randint(0, 9_999_999)
    letter = _DNI_LETTERS[int(str("XYZ".index(prefix)) + f"{n:07d}") % 23]
    if not valid:
        letter = _DNI_LETTERS[(_DNI_LETTERS.index(letter) + rng.randint(1, 22)) % 23]
    return f"{prefix}{n:07d}{letter}"


def gen_cif(rng: random.Random, valid: bool) -> str:
    letter = rng.choice("ABEFGHJUV")  # these organisation types take a digit control character
    body = letter + _digits(rng, 7)
    check = cif.calc_check_digits(body)[0]
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    return body + check


def gen_nss(rng: random.Random, valid: bool) -> str:
    province = rng.randint(1, 52)
    number = rng.randint(10_000_000, 99_999_999)
    check = int(f"{province:02d}{number:08d}") % 97
    if not valid:
        check = (check + rng.randint(1, 96)) % 97
    sep = rng.choice(["", " ", "/"])
    return f"{province:02d}{sep}{number:08d}{sep}{check:02d}"


def gen_phone(rng: random.Random) -> str:
    while True:
        style = rng.choice(["es_mobile", "es_intl", "es_land", "us", "gb"])
        if style == "es_mobile":
            d = "6" + _digits(rng, 8)
            text = f"{d[:3]} {d[3:6]} {d[6:]}"
            region = "ES"
        elif style == "es_intl":
            d = "6" + _digits(rng, 8)
            text, region = f"+34 {d}", "ES"
        elif style == "es_land":
            d = "91" + _digits(rng, 7)
            text, region = f"{d[:2]} {d[2:5]} {d[5:7]} {d[7:]}", "ES"
        elif style == "us":
            d = rng.choice(["415", "212", "312", "617"]) + str(rng.randint(2, 9)) + _digits(rng, 6)
            text, region = f"+1 ({d[:3]}) {d[3:6]}-{d[6:]}", "US"
        else:
            d = "7" + rng.choice("45789") + _digits(rng, 8)
            text, region = f"+44 {d[:4]} {d[4:]}", "GB"
        if phonenumbers.is_valid_number(phonenumbers.parse(text, region)):
            return text


def gen_email(rng: random.Random) -> str:
    first = rng.choice(["lucia", "hugo", "j.smith", "emma_b", "oliver.t", "mgarcia"])
    return f"{first}{rng.randint(1, 999)}@{rng.choice(_DOMAINS)}"


def gen_ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    return (
        "2001:db8:"
        + ":".join(f"{rng.randint(0, 65535):x}" for _ in range(3))
        + "::"
        + f"{rng.randint(1, 65535):x}"
    )


def gen_url(rng: random.Random) -> str:
    return f"https://{rng.choice(['portal', 'intranet', 'www'])}.{rng.choice(_DOMAINS)}/cliente/{rng.randint(1000, 99999)}?ref={rng.randint(1, 99)}"


def gen_passport(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3)) + _digits(rng, 6)


_NEAR_MISS = {
    "IBAN_CODE": lambda rng: gen_iban(rng, False),
    "CREDIT_CARD": lambda rng: gen_card(rng, False),
    "ES_NIF": lambda rng: gen_dni(rng, False),
    "ES_NIE": lambda rng: gen_nie(rng, False),
    "ES_CIF": lambda rng: gen_cif(rng, False),
    "ES_NSS": lambda rng: gen_nss(rng, False),
    "EMAIL_ADDRESS": lambda rng: rng.choice(
        ["soporte(at)correo.es", "admin@localhost", "user@@example"]
    ),
    "IP_ADDRESS": lambda rng: (
        f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}"
    ),
    "PHONE_NUMBER": lambda rng: f"{rng.randint(10, 99)}-{rng.randint(100, 999)}",
}

_GEN = {
    "IBAN_CODE": lambda rng: gen_iban(rng, True),
    "CREDIT_CARD": lambda rng: gen_card(rng, True),
    "ES_NIF": lambda rng: gen_dni(rng, True),
    "ES_NIE": lambda rng: gen_nie(rng, True),
    "ES_CIF": lambda rng: gen_cif(rng, True),
    "ES_NSS": lambda rng: gen_nss(rng, True),
    "PHONE_NUMBER": gen_phone,
    "EMAIL_ADDRESS": gen_email,
    "IP_ADDRESS": gen_ip,
    "URL": gen_url,
    "PASSPORT": gen_passport,
}

_LEAD = {
    "es": {
        "IBAN_CODE": "transfiere el importe a la cuenta {v}",
        "CREDIT_CARD": "cobra con la tarjeta {v}",
        "ES_NIF": "mi DNI es {v}",
        "ES_NIE": "el NIE del trabajador es {v}",
        "ES_CIF": "la empresa tiene CIF {v}",
        "ES_NSS": "su número de la seguridad social es {v}",
        "PHONE_NUMBER": "llámame al {v}",
        "EMAIL_ADDRESS": "escribe a {v}",
        "IP_ADDRESS": "el acceso vino de {v}",
        "URL": "el expediente está en {v}",
        "PASSPORT": "pasaporte {v}",
    },
    "en": {
        "IBAN_CODE": "please wire it to {v}",
        "CREDIT_CARD": "charge card {v}",
        "ES_NIF": "my Spanish ID is {v}",
        "ES_NIE": "the foreigner ID is {v}",
        "ES_CIF": "the company tax code is {v}",
        "ES_NSS": "social security no. {v}",
        "PHONE_NUMBER": "call me on {v}",
        "EMAIL_ADDRESS": "reply to {v}",
        "IP_ADDRESS": "the login came from {v}",
        "URL": "see {v}",
        "PASSPORT": "passport number: {v}",
    },
}
_NEAR_LEAD = {
    "es": "y el código {v} no es válido",
    "en": "and reference {v} is not valid",
}
_OPENERS = {
    "es": ["Hola, soy {name}:", "Buenos días.", "Consulta urgente:", "Te paso los datos,"],
    "en": ["Hi, this is {name}.", "Good morning.", "Quick question:", "Here are the details:"],
}


def generate(n: int = 600, seed: int = 22) -> list[Message]:
    """`n` messages, half Spanish and half English, each with 1-3 labelled values and, for
    about a third, a near-miss of another type."""
    rng = random.Random(seed)
    types = list(_GEN)
    out = []
    for i in range(n):
        lang = "es" if i % 2 == 0 else "en"
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        parts = [rng.choice(_OPENERS[lang]).format(name=name)]
        msg = Message("", lang)
        chosen = [types[i % len(types)]] + rng.sample(types, rng.randint(0, 2))
        for kind in dict.fromkeys(chosen):
            value = _GEN[kind](rng)
            msg.labels.append((kind, value))
            parts.append(_LEAD[lang][kind].format(v=value) + rng.choice([",", ";", ".", ""]))
        if i % 3 == 0:
            kind = rng.choice(list(_NEAR_MISS))
            value = _NEAR_MISS[kind](rng)
            msg.near_misses.append((kind, value))
            parts.append(_NEAR_LEAD[lang].format(v=value) + ".")
        msg.text = " ".join(parts)
        out.append(msg)
    return out


# ---- names, places and organisations (NER) ------------------------------------------------
# Kept apart from `generate` so that its messages (and the checksum test's numbers) stay as
# they were: there the opener's name is not a label, here every name, place and organisation is.

_NER_FIRST = {
    "es": (
        "Lucía Hugo Martina Mateo Carmen Javier Pilar Alejandro "
        "Marta Sergio Elena Raúl Nuria Íñigo Rocío Andrés"
    ).split(),
    "en": (
        "Alice James Emma Oliver Sarah Michael Laura David "
        "Rebecca Thomas Hannah George Olivia Daniel Chloe Robert"
    ).split(),
}
_NER_LAST = {
    "es": (
        "García Martínez López Sánchez Pérez Fernández Gómez Ruiz "
        "Navarro Jiménez Moreno Álvarez Romero Torres Domínguez Castillo"
    ).split(),
    "en": (
        "Smith Jones Taylor Brown Williams Wilson Johnson Davies "
        "Miller Clarke Walker Wright Thompson Robinson Hughes Edwards"
    ).split(),
}
_NER_PLACES = {
    "es": (
        "Madrid Sevilla Valencia Bilbao Zaragoza Málaga Barcelona "
        "Salamanca Granada Valladolid Córdoba Alicante Murcia Toledo"
    ).split(),
    "en": (
        "London Manchester Boston Chicago Dublin Edinburgh Toronto "
        "Seattle Liverpool Denver Atlanta Glasgow Philadelphia Bristol"
    ).split(),
}
_NER_ORGS = {
    "es": [
        "Telefónica",
        "Banco Santander",
        "BBVA",
        "Iberdrola",
        "Repsol",
        "Mercadona",
        "Inditex",
        "la Universidad de Salamanca",
        "el Ayuntamiento de Madrid",
        "Renfe",
        "la Agencia Tributaria",
        "CaixaBank",
        "Correos",
        "el Hospital Clínic",
    ],
    "en": [
        "Microsoft",
        "Google",
        "Barclays",
        "HSBC",
        "Goldman Sachs",
        "the World Bank",
        "Oxford University",
        "the BBC",
        "Amazon",
        "Deloitte",
        "the European Commission",
        "General Electric",
        "Pfizer",
        "the Red Cross",
    ],
}
_NER_TEMPLATES = {
    "es": [
        "{person} vive en {place} y trabaja para {org}.",
        "Ayer me reuní con {person} en la oficina de {org} en {place}.",
        "La solicitud de {person} llegó desde {place}; la tramita {org}.",
        "Según {person}, el contrato con {org} se firmará en {place} la semana que viene.",
        "{person} se mudó a {place} cuando entró en {org}.",
        "Por favor, envía la factura a {person}, de {org}, con sede en {place}.",
    ],
    "en": [
        "{person} lives in {place} and works for {org}.",
        "Yesterday I met {person} at the {org} office in {place}.",
        "The request from {person} came in from {place}; {org} is handling it.",
        "According to {person}, the contract with {org} will be signed in {place} next week.",
        "{person} moved to {place} after joining {org}.",
        "Please send the invoice to {person} at {org}, based in {place}.",
    ],
}


def _strip_article(org: str) -> str:
    """The organisation as the label: `la Universidad de Salamanca` -> `Universidad de Salamanca`.

    NER pipelines differ on whether a leading article belongs to the name; the leak that matters
    is the name itself."""
    for article in ("the ", "la ", "el "):
        if org.startswith(article):
            return org[len(article) :]
    return org


def generate_named(n: int = 300, seed: int = 23) -> list[Message]:
    """`n` messages (half Spanish, half English) each naming a person, a place and an
    organisation, labelled, plus one checksum-validated value (an IBAN, a DNI, ...)."""
    rng = random.Random(seed)
    checksum = ["IBAN_CODE", "ES_NIF", "ES_NIE", "PHONE_NUMBER", "EMAIL_ADDRESS"]
    out = []
    for i in range(n):
        lang = "es" if i % 2 == 0 else "en"
        person = f"{rng.choice(_NER_FIRST[lang])} {rng.choice(_NER_LAST[lang])}"
        place = rng.choice(_NER_PLACES[lang])
        org = rng.choice(_NER_ORGS[lang])
        sentence = rng.choice(_NER_TEMPLATES[lang]).format(person=person, place=place, org=org)
        if lang == "en" and sentence[0].islower():
            sentence = sentence[0].upper() + sentence[1:]
        kind = checksum[i % len(checksum)]
        value = _GEN[kind](rng)
        msg = Message("", lang)
        msg.labels = [
            ("PERSON", person),
            ("LOCATION", place),
            ("ORGANIZATION", _strip_article(org)),
            (kind, value),
        ]
        lead = _LEAD[lang][kind].format(v=value)
        msg.text = f"{sentence} {lead[0].upper()}{lead[1:]}."
        out.append(msg)
    return out
