"""Chat templates for models whose tokenizer ships none.

The bundled Gemma-3-270M GGUF carries no ``tokenizer.chat_template``, so a chat completion had no way
to format its messages. Gemma's turn format is public and fixed (``<start_of_turn>user ... <end_of_turn>``,
the assistant's role named ``model``, a system message folded into the first user turn), so it is the
fallback for the Gemma 3 family. A tokenizer's own template always wins.
"""

from __future__ import annotations

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
