"""Prompt-injection / jailbreak check on requests and a check on answers.

Two engines: a rules engine (regular expressions in English and Spanish, microseconds, in the
gateway) or a guard model served by an on-prem backend (any OpenAI-compatible endpoint; a
Llama-Guard-style classifier answering `safe` or `unsafe ...`). Both fail closed: a guard that
errors or runs out of time returns an `error` verdict, which a tenant's `block` action blocks.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

import aiohttp

from soberana.gateway.privacy.config import GuardModelConfig, PrivacyConfig

# Phrasings of the public jailbreak and injection corpora (e.g. "ignore previous instructions",
# DAN prompts, system-prompt extraction), in English and Spanish.
_INJECTION = {
    "ignore_instructions": r"\b(ignore|disregard|forget)\b.{0,40}\b(previous|prior|above|earlier|all|your)\b.{0,20}\b(instructions|rules|prompts?|directions)\b",
    "ignorar_instrucciones": r"\b(ignora|olvida|omite|descarta)\b.{0,40}\b(instrucciones|reglas|indicaciones|normas)\b",
    "reveal_system_prompt": r"\b(reveal|print|show|repeat|output)\b.{0,30}\b(system|hidden|initial)\s+(prompt|instructions|message)\b",
    "revelar_prompt": r"\b(revela|muestra|repite|imprime)\b.{0,30}\b(prompt|instrucciones)\s+(del\s+sistema|de\s+sistema|ocult[ao]s?|iniciales)\b",
    "dan_jailbreak": r"\b(DAN|do anything now|developer mode|modo desarrollador|jailbreak|jailbroken)\b",
    "role_override": r"\b(you are no longer|from now on you are|a partir de ahora eres|ya no eres)\b",
    "no_restrictions": r"\b(without|no|sin)\s+(any\s+)?(restrictions|filters|limits|restricciones|filtros|l[ií]mites)\b",
}
_OUTPUT = {
    "jailbreak_ack": r"\b(DAN mode enabled|developer mode enabled|jailbreak (successful|exitoso)|modo desarrollador activado)\b",
    "system_prompt_leak": r"\b(my|mi)\s+(system prompt|prompt del sistema)\s+(is|es)\b",
}


@dataclass(frozen=True)
class Verdict:
    """One check's result: `flagged` with the rule (or guard-model category) that fired."""

    check: str  # input | output
    result: str  # pass | flagged | error
    rule: str = ""

    def as_record(self) -> dict:
        return {"check": self.check, "result": self.result, "rule": self.rule}


class RulesGuard:
    """Compiled rule sets; `check` is pure and fast enough for the request path."""

    def __init__(
        self, extra_input: tuple[str, ...] = (), extra_output: tuple[str, ...] = ()
    ) -> None:
        flags = re.IGNORECASE | re.DOTALL
        self.input = [(n, re.compile(p, flags)) for n, p in _INJECTION.items()]
        self.input += [(f"custom_{i}", re.compile(p, flags)) for i, p in enumerate(extra_input)]
        self.output = [(n, re.compile(p, flags)) for n, p in _OUTPUT.items()]
        self.output += [(f"custom_{i}", re.compile(p, flags)) for i, p in enumerate(extra_output)]

    def check(self, check: str, text: str) -> Verdict:
        rules = self.input if check == "input" else self.output
        for name, pattern in rules:
            if pattern.search(text):
                return Verdict(check, "flagged", name)
        return Verdict(check, "pass")


class ModelGuard:
    """Asks an on-prem OpenAI-compatible classifier; `unsafe` flags, anything unreadable errors."""

    def __init__(self, config: GuardModelConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session

    async def check(self, check: str, text: str) -> Verdict:
        role = "user" if check == "input" else "assistant"
        body = {
            "model": self.config.model,
            "messages": [{"role": role, "content": text}],
            "max_tokens": 16,
            "temperature": 0,
        }
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self.session.post(
                    self.config.endpoint + "/v1/chat/completions", json=body
                ) as r:
                    if r.status != 200:
                        return Verdict(check, "error", f"guard_http_{r.status}")
                    answer = json.loads(await r.read())
            content = answer["choices"][0]["message"]["content"].strip().lower()
        except TimeoutError:
            return Verdict(check, "error", "guard_timeout")
        except (
            aiohttp.ClientError,
            OSError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            AttributeError,
        ):
            return Verdict(check, "error", "guard_unavailable")
        if content.startswith("unsafe"):
            category = content.split()[1] if len(content.split()) > 1 else ""
            return Verdict(check, "flagged", f"guard_model:{category}"[:64])
        if content.startswith("safe"):
            return Verdict(check, "pass")
        return Verdict(check, "error", "guard_unreadable")


class Guardrails:
    """The configured engine behind one `check(check, text)` call with a time limit."""

    def __init__(self, config: PrivacyConfig, session: aiohttp.ClientSession | None) -> None:
        self.rules = RulesGuard(config.extra_injection_patterns, config.extra_output_patterns)
        self.model = (
            ModelGuard(config.guard_model, session)
            if config.guard_engine == "model" and config.guard_model and session
            else None
        )
        self.timeout_s = config.guard_timeout_s

    async def check(self, check: str, text: str) -> Verdict:
        if self.model is None:
            return self.rules.check(check, text)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.model.check(check, text)
        except TimeoutError:
            return Verdict(check, "error", "guard_timeout")
