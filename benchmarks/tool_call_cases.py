"""The tool-calling evaluation's tools and prompts (written for this project): eight tools with
realistic parameter schemas (enums, formats, patterns, bounds, arrays, nested objects) and
prompts that each name what they want, with the call they should produce.

`expected` is the function the prompt asks for (None: the model should answer without a call)
and, for a call, the arguments it must carry: a plain value must be equal (strings compared
without case or surrounding space), `Contains(...)` must be a substring of a string argument,
`OneOf(...)` any one of the values. Arguments the prompt does not fix are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Contains:
    text: str


@dataclass(frozen=True)
class OneOf:
    values: tuple


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


TOOLS = [
    _fn("get_weather", "Current weather or the forecast for a city.", {
        "location": {"type": "string", "description": "City name, e.g. 'Madrid'"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 0, "maximum": 7,
                 "description": "0 for now, else the number of forecast days"},
    }, ["location"]),
    _fn("search_flights", "Search one-way flights between two airports.", {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code"},
        "destination": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code"},
        "date": {"type": "string", "format": "date", "description": "YYYY-MM-DD"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"]},
    }, ["origin", "destination", "date"]),
    _fn("send_email", "Send an e-mail.", {
        "to": {"type": "array", "items": {"type": "string", "format": "email"}, "minItems": 1},
        "subject": {"type": "string", "maxLength": 120},
        "body": {"type": "string"},
        "cc": {"type": "array", "items": {"type": "string", "format": "email"}},
    }, ["to", "subject", "body"]),
    _fn("create_event", "Create a calendar event.", {
        "title": {"type": "string"},
        "start": {"type": "string", "format": "date-time",
                  "description": "ISO 8601, e.g. 2026-12-15T10:00:00Z"},
        "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 1440},
        "attendees": {"type": "array", "items": {"type": "string"}},
    }, ["title", "start", "duration_minutes"]),
    _fn("convert_currency", "Convert an amount between currencies at today's rate.", {
        "amount": {"type": "number", "exclusiveMinimum": 0},
        "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
    }, ["amount", "from_currency", "to_currency"]),
    _fn("get_stock_price", "Latest price of a listed company's stock.", {
        "ticker": {"type": "string", "pattern": "^[A-Z.]{1,6}$"},
        "exchange": {"type": "string", "enum": ["NASDAQ", "NYSE", "LSE", "BME", "XETRA"]},
    }, ["ticker"]),
    _fn("create_ticket", "Open an issue in the team's bug tracker.", {
        "title": {"type": "string", "maxLength": 100},
        "priority": {"type": "string", "enum": ["low", "medium", "high", "critical"]},
        "component": {"type": "string", "enum": ["api", "frontend", "database", "auth"]},
        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "assignee": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    }, ["title", "priority", "component"]),
    _fn("search_files", "Search the repository's files.", {
        "query": {"type": "string", "minLength": 1},
        "extension": {"type": "string", "enum": ["py", "js", "ts", "md", "yaml", "sql"]},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 100},
        "filters": {"type": "object", "properties": {
            "path_prefix": {"type": "string"},
            "modified_after": {"type": "string", "format": "date"},
        }, "additionalProperties": False},
    }, ["query"]),
]


def _case(prompt: str, function: str | None, **arguments: Any) -> dict:
    return {"prompt": prompt, "function": function, "arguments": arguments}


CASES = [
    # get_weather
    _case("What's the weather like in Madrid right now?", "get_weather", location="Madrid"),
    _case("Give me the 3-day forecast for Tokyo in celsius.", "get_weather",
          location="Tokyo", unit="celsius", days=3),
    _case("Is it cold in Chicago today? Use fahrenheit.", "get_weather",
          location="Chicago", unit="fahrenheit"),
    _case("Will it rain in Bilbao over the next 5 days?", "get_weather", location="Bilbao", days=5),
    _case("Temperature in Oslo now, in celsius please.", "get_weather",
          location="Oslo", unit="celsius"),
    _case("Check the weather for Buenos Aires.", "get_weather", location="Buenos Aires"),
    _case("I'm flying to Sydney tomorrow - what's the forecast there for the next 2 days?",
          "get_weather", location="Sydney", days=2),
    # search_flights
    _case("Find flights from MAD to JFK on 2026-12-20.", "search_flights",
          origin="MAD", destination="JFK", date="2026-12-20"),
    _case("Search business class flights from LHR to SFO on 2027-01-08 for 2 passengers.",
          "search_flights", origin="LHR", destination="SFO", date="2027-01-08", passengers=2,
          cabin="business"),
    _case("I need an economy flight BCN to CDG on 2026-12-24, just me.", "search_flights",
          origin="BCN", destination="CDG", date="2026-12-24", cabin="economy"),
    _case("Look for first class seats from DXB to SIN on 2027-02-14 for 4 people.",
          "search_flights", origin="DXB", destination="SIN", date="2027-02-14", passengers=4,
          cabin="first"),
    _case("Flights from SEA to LAX on 2026-12-31 please, 3 passengers.", "search_flights",
          origin="SEA", destination="LAX", date="2026-12-31", passengers=3),
    _case("Any premium economy flights from FRA to ORD on 2027-03-02?", "search_flights",
          origin="FRA", destination="ORD", date="2027-03-02", cabin="premium"),
    _case("Book-search: AMS to LIS, 2027-01-15.", "search_flights",
          origin="AMS", destination="LIS", date="2027-01-15"),
    # send_email
    _case("Email alice@example.com with subject 'Lunch' and say: Are you free at noon?",
          "send_email", to=["alice@example.com"], subject="Lunch", body=Contains("noon")),
    _case("Send an email to bob@corp.io and carol@corp.io, subject 'Release 2.1', body: "
          "The release is out today.", "send_email",
          to=["bob@corp.io", "carol@corp.io"], subject="Release 2.1", body=Contains("release")),
    _case("Write to hr@company.es with subject 'Vacation request' asking for December 22 "
          "to 26 off.", "send_email", to=["hr@company.es"], subject="Vacation request",
          body=Contains("22")),
    _case("Send dev-team@startup.dev an email titled 'Standup moved' saying standup is at "
          "10:30 tomorrow, and cc manager@startup.dev.", "send_email",
          to=["dev-team@startup.dev"], subject="Standup moved", body=Contains("10:30"),
          cc=["manager@startup.dev"]),
    _case("Email support@vendor.com, subject 'Invoice 4471', body: Please resend invoice 4471.",
          "send_email", to=["support@vendor.com"], subject="Invoice 4471",
          body=Contains("4471")),
    _case("Let jane.doe@mail.org know by email that the meeting is cancelled; subject "
          "'Meeting cancelled'.", "send_email", to=["jane.doe@mail.org"],
          subject="Meeting cancelled", body=Contains("cancel")),
    _case("Send an email to ops@infra.net with subject 'Disk alert' and body 'Disk at 95% on "
          "db-2'.", "send_email", to=["ops@infra.net"], subject="Disk alert",
          body=Contains("95%")),
    # create_event
    _case("Create a 30 minute event 'Design review' starting 2026-12-15T10:00:00Z.",
          "create_event", title="Design review", start="2026-12-15T10:00:00Z",
          duration_minutes=30),
    _case("Schedule 'Sprint planning' on 2026-12-16T09:00:00Z for 90 minutes with Ana and "
          "Luis.", "create_event", title="Sprint planning", start="2026-12-16T09:00:00Z",
          duration_minutes=90, attendees=["Ana", "Luis"]),
    _case("Put a one-hour 'Dentist' appointment in my calendar at 2027-01-10T16:00:00Z.",
          "create_event", title="Dentist", start="2027-01-10T16:00:00Z", duration_minutes=60),
    _case("Add an event called 'Team lunch' at 2026-12-18T12:30:00Z lasting 45 minutes.",
          "create_event", title="Team lunch", start="2026-12-18T12:30:00Z",
          duration_minutes=45),
    _case("Book a 2 hour 'Budget workshop' at 2027-02-03T14:00:00Z with Maria, Tom and Wei.",
          "create_event", title="Budget workshop", start="2027-02-03T14:00:00Z",
          duration_minutes=120, attendees=["Maria", "Tom", "Wei"]),
    _case("Create a 15 minute event '1:1 with Sam' at 2026-12-21T08:45:00Z.", "create_event",
          title="1:1 with Sam", start="2026-12-21T08:45:00Z", duration_minutes=15),
    # convert_currency
    _case("Convert 100 USD to EUR.", "convert_currency",
          amount=100, from_currency="USD", to_currency="EUR"),
    _case("How much is 2500 JPY in GBP?", "convert_currency",
          amount=2500, from_currency="JPY", to_currency="GBP"),
    _case("Change 49.99 EUR into MXN.", "convert_currency",
          amount=49.99, from_currency="EUR", to_currency="MXN"),
    _case("What is 1,000 CHF worth in USD today?", "convert_currency",
          amount=1000, from_currency="CHF", to_currency="USD"),
    _case("Convert 75.5 GBP to CAD please.", "convert_currency",
          amount=75.5, from_currency="GBP", to_currency="CAD"),
    _case("I have 300 AUD; how many NZD is that?", "convert_currency",
          amount=300, from_currency="AUD", to_currency="NZD"),
    # get_stock_price
    _case("What's Apple's stock price? Ticker AAPL on NASDAQ.", "get_stock_price",
          ticker="AAPL", exchange="NASDAQ"),
    _case("Get the latest price of MSFT.", "get_stock_price", ticker="MSFT"),
    _case("How is IBM trading on the NYSE?", "get_stock_price", ticker="IBM", exchange="NYSE"),
    _case("Price of SAN on BME, please.", "get_stock_price", ticker="SAN", exchange="BME"),
    _case("Check the stock price for NVDA.", "get_stock_price", ticker="NVDA"),
    _case("Latest quote for SAP on XETRA.", "get_stock_price", ticker="SAP", exchange="XETRA"),
    # create_ticket
    _case("Open a critical ticket for the auth component: 'Login fails with SSO'.",
          "create_ticket", title=Contains("SSO"), priority="critical", component="auth"),
    _case("File a low priority frontend bug titled 'Button misaligned on mobile'.",
          "create_ticket", title=Contains("misaligned"), priority="low", component="frontend"),
    _case("Create a high priority database ticket 'Slow query on orders table', label it "
          "performance.", "create_ticket", title=Contains("slow query"), priority="high",
          component="database", labels=["performance"]),
    _case("Open a medium priority api ticket 'Rate limit header missing' and assign it to "
          "kim.", "create_ticket", title=Contains("rate limit"), priority="medium",
          component="api", assignee="kim"),
    _case("New ticket: 'Password reset email not sent', auth component, high priority.",
          "create_ticket", title=Contains("password reset"), priority="high",
          component="auth"),
    _case("Report a critical api issue: '500 on /v1/orders'.", "create_ticket",
          title=Contains("/v1/orders"), priority="critical", component="api"),
    # search_files
    _case("Search the repo for 'def tokenize' in python files.", "search_files",
          query=Contains("tokenize"), extension="py"),
    _case("Find markdown files mentioning 'installation'.", "search_files",
          query=Contains("installation"), extension="md"),
    _case("Look for 'CREATE TABLE users' in sql files, at most 5 results.", "search_files",
          query=Contains("create table"), extension="sql", max_results=5),
    _case("Search for 'useEffect' in ts files under src/components.", "search_files",
          query=Contains("useEffect"), extension="ts",
          filters={"path_prefix": OneOf(("src/components", "src/components/"))}),
    _case("Find yaml files that mention 'replicas', 20 results max.", "search_files",
          query=Contains("replicas"), extension="yaml", max_results=20),
    _case("Search for TODO comments in js files changed after 2026-11-01.", "search_files",
          query=Contains("todo"), extension="js", filters={"modified_after": "2026-11-01"}),
    # no tool fits: the model should answer in text
    _case("Explain what a Python list comprehension is, in one sentence.", None),
    _case("What is the time complexity of binary search?", None),
    _case("Write a haiku about autumn.", None),
    _case("Reverse the string 'hello' for me.", None),
]


def matches(expected: Any, actual: Any) -> bool:
    """Whether an argument value is what the prompt asked for (see the module's rules)."""
    if isinstance(expected, Contains):
        return isinstance(actual, str) and expected.text.lower() in actual.lower()
    if isinstance(expected, OneOf):
        return any(matches(v, actual) for v in expected.values)
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(matches(e, a) for e, a in zip(expected, actual)))
    if isinstance(expected, str):
        return isinstance(actual, str) and expected.strip().lower() == actual.strip().lower()
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return (isinstance(actual, (int, float)) and not isinstance(actual, bool)
                and abs(actual - expected) < 1e-9)
    return expected == actual
