"""Chat templates: the model's own, a Jinja file, or a named built-in for a model that has none.

bdvax_lab renders every prompt through the tokenizer's chat template
(:func:`bdvax_lab.core.data.format_prompt`). Instruction-tuned models ship one; a model without one (a base
model, a GGUF whose metadata has none) needs one chosen by the user: ``--chat-template FILE`` (a Jinja
template, as in ``tokenizer_config.json``'s ``chat_template``) or one of the built-in names in
:data:`CHAT_TEMPLATES`. The chosen template is stored with the tokenizer of every artifact written from
the model, so it is chosen once.

Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: ChatML (SmolLM2, Qwen): ``<|im_start|>role\n…<|im_end|>``
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Gemma: ``<start_of_turn>user|model\n…<end_of_turn>``, no system role (a system message opens the first
#: user turn), the BOS token first
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set sys = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set sys.text = message['content'] + '\\n\\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
    "{% if message['role'] == 'user' %}{{ sys.text }}{% set sys.text = '' %}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

#: Phi-3: ``<|user|>\n…<|end|>\n<|assistant|>\n``
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

#: Llama 3: ``<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>``, the BOS token first
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

#: Built-in templates by name (``--chat-template NAME``).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": CHATML_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "phi3": PHI3_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
}


class ChatTemplateError(ValueError):
    """A chat template is missing, unreadable or does not render a conversation (the message says which)."""


def _hint() -> str:
    return "pass --chat-template FILE (a Jinja chat template) or a built-in name: " + ", ".join(
        CHAT_TEMPLATES
    )


def read_chat_template(value: str | Path) -> str:
    """The template text of a built-in name or of a Jinja file (UTF-8, non-empty); one-line errors."""
    text = str(value)
    if text in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[text]
    path = Path(text).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"--chat-template {text}: neither a file nor a built-in name; {_hint()}")
    try:
        body = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ChatTemplateError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not body.strip():
        raise ChatTemplateError(f"{path}: empty chat template")
    return body


def check_chat_template(tokenizer: Any, where: str) -> None:
    """Render a short conversation through the tokenizer's template; any failure names ``where``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(f"{where}: the tokenizer has no chat template; {_hint()}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        text = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError and whatever the template raises itself
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise ChatTemplateError(
            f"{where}: the chat template does not render a conversation ({first})"
        ) from None
    if "hi" not in text or "hello" not in full:
        raise ChatTemplateError(f"{where}: the chat template drops the messages' content")


def use_chat_template(tokenizer: Any, value: str | Path | None, where: str) -> Any:
    """Set ``tokenizer.chat_template`` from ``value`` (a built-in name or a file), if given, and check it.

    Without ``value`` the tokenizer must already have a template (:class:`ChatTemplateError` otherwise,
    naming ``where`` and what to pass). Returns the tokenizer.
    """
    if value is not None:
        tokenizer.chat_template = read_chat_template(value)
        where = f"{where} with --chat-template {value}"
    check_chat_template(tokenizer, where)
    return tokenizer
