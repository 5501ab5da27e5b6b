"""Moved to router/core/generate.py (the routing policies need it too, and net must not import
stages); kept so stage code written against the old module keeps importing."""

from router.core.generate import Prompt, generate_request, single_input_ids  # noqa: F401
