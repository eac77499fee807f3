"""Structured outputs: grammars (JSON schema, regex, choice, Lark) compiled with llguidance,
and the per-token masks that keep sampling inside them."""
