"""The fields of OpenAI-style request bodies (`/v1/completions`, `/v1/chat/completions`) that
prefix-affinity routing reads. Kept raw: routing only needs their bytes (or, for a chat template,
their values), and the body is forwarded as the client sent it."""

from __future__ import annotations

import msgspec


class OpenAIPromptFields(msgspec.Struct):
    prompt: msgspec.Raw = msgspec.Raw()  # /v1/completions: str, [str], [int] or [[int]]
    messages: msgspec.Raw = msgspec.Raw()  # /v1/chat/completions
    tools: msgspec.Raw = msgspec.Raw()


openai_prompt_decoder = msgspec.json.Decoder(OpenAIPromptFields)
raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
str_decoder = msgspec.json.Decoder(str)
ids_decoder = msgspec.json.Decoder(list[int])
strs_decoder = msgspec.json.Decoder(list[str])


def present(raw: msgspec.Raw) -> bool:
    return len(raw) > 0 and not (len(raw) == 4 and bytes(raw) == b"null")  # (no copy of a long prompt)
