"""Structured fields whose name says what their value is: `{"customer_name": "Carmen"}`.

Tool-call arguments and `/v1/messages` tool_use inputs carry names as bare JSON values, with no
sentence around them. The small NER pipelines judge a name by its context and miss many bare
ones (measured with es_core_news_sm + en_core_web_sm 3.8: "Carmen", "Acme", "Lugo" after
"city: " are not tagged), so a value under a key that names a person, a place or an
organisation is redacted whole, as that type, whatever the model says. Keys are compared
normalised (lower case, no accents, no `_`, `-`, spaces or camelCase breaks): `firstName`,
`first_name` and `First Name` are one key. A hint costs a lookup, not an NER call; a wrong hint
costs the cloud model some context (the value comes back in the answer), never a leak.
"""

from __future__ import annotations

import re
import unicodedata

_PERSON = {
    "name", "fullname", "firstname", "lastname", "surname", "givenname", "familyname",
    "middlename", "nombre", "nombrecompleto", "apellido", "apellidos", "primerapellido",
    "segundoapellido", "customer", "customername", "cliente", "nombrecliente", "patient",
    "patientname", "paciente", "nombrepaciente", "contact", "contactname", "contacto",
    "person", "personname", "persona", "employee", "employeename", "empleado", "recipient",
    "recipientname", "destinatario", "sender", "sendername", "remitente", "titular",
    "holder", "accountholder", "cardholder", "owner", "ownername", "propietario", "passenger",
    "pasajero", "guest", "guestname", "huesped", "beneficiary", "beneficiario", "username",
    "displayname", "doctor", "medico", "spouse", "conyuge",
}  # fmt: skip
_LOCATION = {
    "address", "streetaddress", "street", "city", "town", "birthplace", "placeofbirth",
    "hometown", "location", "direccion", "domicilio", "calle", "ciudad", "localidad",
    "municipio", "poblacion", "lugardenacimiento", "ubicacion",
}  # fmt: skip
_ORGANIZATION = {
    "company", "companyname", "organization", "organisation", "organizationname", "employer",
    "empresa", "nombreempresa", "organizacion", "entidad", "razonsocial", "bank", "bankname",
    "banco", "insurer", "aseguradora",
}  # fmt: skip
_HINTS = (
    {k: "PERSON" for k in _PERSON}
    | {k: "LOCATION" for k in _LOCATION}
    | {k: "ORGANIZATION" for k in _ORGANIZATION}
)
_SEPARATORS = re.compile(r"[\s_\-.]+")


def hinted_type(key: str | None) -> str | None:
    """The entity type the field `key` holds (PERSON, LOCATION, ORGANIZATION), or None."""
    if not key or len(key) > 40:
        return None
    plain = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    return _HINTS.get(_SEPARATORS.sub("", plain).lower())
