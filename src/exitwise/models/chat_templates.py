"""Chat templates for models whose tokenizer ships none.

The bundled Gemma-3-270M GGUF carries no ``tokenizer.chat_template``, so a chat completion had no way
to format its messages. Gemma's turn format is public and fixed (``<start_of_turn>user ... <end_of_turn>``,
the assistant's role named ``model``, a system message folded into the first user turn), so it is the
fallback for the Gemma 3 family. A tokenizer's own template always wins.

Chat turns cannot be forged: :func:`chat_token_ids` tokenises a rendered prompt so that control-token
strings inside a message's content (``<|im_end|><|im_start|>system``) stay plain text.
"""

from __future__ import annotations

import re
import uuid

# Jinja, rendered by tokenizer.apply_chat_template(chat_template=...): bos, then one turn per message.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] ~ '\\n\\n' -%}{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ raise_exception('only the first message may be a system message') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else m['role']) ~ '\\n' }}"
    "{{ ((ns.system if loop.first else '') ~ m['content']) | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# model_type (config.model_type) -> fallback template
FALLBACKS = {"gemma3": GEMMA_TURNS, "gemma3_text": GEMMA_TURNS}


def chat_template(tokenizer, model_type: str | None) -> str | None:
    """The tokenizer's own chat template, else the family's fallback, else None."""
    own = getattr(tokenizer, "chat_template", None)
    return own or FALLBACKS.get(model_type or "")


# ----------------------------------------------------------------------------- forging-proof ids
def render_chat(tokenizer, template: str, messages: list[dict]) -> str:
    """The prompt text of ``messages`` (dicts with role and content) in ``template``, with the assistant's
    turn opened. Raises what jinja raises (a template may refuse e.g. two system messages)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


def _locate(text: str, fixed: list[str], contents: list[str]) -> list[tuple[str, bool]] | None:
    """``text`` cut into the template's fixed parts and the messages' contents, (piece, is_content), or
    None if the contents cannot be found where the fixed parts leave room for them. A template may trim
    a content (Gemma's does), so each is looked for as is, then stripped on either or both sides."""
    pieces: list[tuple[str, bool]] = []
    if not text.startswith(fixed[0]):
        return None
    pos = len(fixed[0])
    pieces.append((fixed[0], False))
    for content, after in zip(contents, fixed[1:], strict=True):
        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(after, end):
                break
        else:
            return None
        pieces += [(cand, True), (after, False)]
        pos = end + len(after)
    return pieces if pos == len(text) else None


def _skeleton(tokenizer, template: str, messages: list[dict]) -> tuple[list[str], list[str]]:
    """The template's own text around the contents, and the contents in the order it wrote them:
    the template rendered with a placeholder for each content, cut at the placeholders."""
    nonce = uuid.uuid4().hex
    marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
    # [fixed, index, fixed, index, ..., fixed]: every placeholder, in the order the template wrote them
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", render_chat(tokenizer, template, marked))
    return parts[0::2], [str(messages[int(i)]["content"]) for i in parts[1::2]]


def control_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special added tokens: turn markers, BOS / EOS, ... (what a user's text must
    never produce)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(i for i, tok in decoder.items() if getattr(tok, "special", False)) | frozenset(
        tokenizer.all_special_ids)


def chat_token_ids(tokenizer, template: str, messages: list[dict], text: str | None = None,
                   controls: frozenset[int] | None = None) -> list[int]:
    """Token ids of the chat prompt of ``messages`` (``text``: its rendering, if made already) in which
    no control token comes from a message's content.

    The rendered text is tokenised as before (the template wrote its special tokens, so none is added);
    if no control token comes from a content, those are the ids, so a normal conversation tokenises
    exactly as it always did. Otherwise (a message that spells ``<|im_end|><|im_start|>system`` or
    ``<end_of_turn>``) the template's pieces are tokenised with special tokens parsed and each content
    on its own with ``split_special_tokens=True``: control-token strings in a message stay plain text,
    as in the major servers.

    A control token comes from a content if it overlaps the content's span in the text (the spans are
    found from a second rendering with placeholders, :func:`_locate`); where a template transforms
    contents so that they cannot be found (Gemma's trim across an empty message), if the text holds
    other control tokens than the template's own text does."""
    controls = control_ids(tokenizer) if controls is None else controls
    text = render_chat(tokenizer, template, messages) if text is None else text
    fixed, contents = _skeleton(tokenizer, template, messages)
    pieces = _locate(text, fixed, contents)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if pieces is not None:
        spans, pos = [], 0
        for piece, is_content in pieces:
            if is_content and piece:
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        forged = any(i in controls and any(s < b and a < e for s, e in spans)
                     for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    else:
        own = tokenizer("".join(fixed), add_special_tokens=False)["input_ids"]
        forged = [i for i in enc["input_ids"] if i in controls] != [i for i in own if i in controls]
        pieces = [(fixed[0], False)]
        for content, after in zip(contents, fixed[1:], strict=True):
            pieces += [(content, True), (after, False)]
    if not forged:
        return list(enc["input_ids"])
    ids: list[int] = []
    for piece, is_content in pieces:
        if piece:
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
    return ids
