"""Speculative decoding: proposers guess tokens, the target verifies them in one forward
pass, rejection sampling keeps the target's distribution (docs/spec-decode.md)."""
