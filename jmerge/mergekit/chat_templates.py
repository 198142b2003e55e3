"""Chat templates a config's ``chat_template`` may name, written for jmerge from the public formats.

``chat_template`` in a merge config is a template name (below), ``auto`` (the template most of the input
models use; resolved when the output is written) or a literal Jinja template. The rule that tells them
apart is mergekit's: a short single-line value without ``{`` is a name; anything else is a template and
must contain ``{`` (mergekit also refuses templates under 20 characters; jmerge passes them through). Each template renders ``messages`` (``role`` and
``content``), honours ``add_generation_prompt`` and uses the tokenizer's ``bos_token`` / ``eos_token``
where the format has them, as ``transformers``' ``apply_chat_template`` provides them.

References: the published prompt formats: ChatML (OpenAI), Llama 2 and Llama 3 (Meta), Mistral
Instruct (Mistral AI), Alpaca (Taori et al., Stanford 2023), Vicuna (Chiang et al., LMSYS 2023), Zephyr
(Tunstall et al., 2023), Gemma (Google 2024), Phi-3 (Microsoft 2024), EXAONE 3 (LG AI Research 2024);
Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track) for ``chat_template`` in configs.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["CHAT_TEMPLATES", "AUTO", "chat_template_problem", "named_chat_template"]

AUTO = "auto"
"""``chat_template: auto``: the template used by most input models (ties: the first in config order)."""

_SYSTEM_SPLIT = (r"{%- if messages and messages[0]['role'] == 'system' -%}"
                 r"{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
                 r"{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}")
_ALTERNATE = (r"{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
              r"{{- raise_exception('%s: after an optional system message, user and assistant messages must "
              r"alternate, starting with user') -}}{%- endif -%}")

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        r"{%- for message in messages -%}"
        r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"),
    "llama3": (
        r"{{- bos_token -}}"
        r"{%- for message in messages -%}"
        r"{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim)"
        r" + '<|eot_id|>' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"),
    "llama2": (
        _SYSTEM_SPLIT
        + r"{%- for message in rest -%}" + _ALTERNATE.replace("%s", "llama2")
        + r"{%- if message['role'] == 'user' -%}"
        r"{%- if loop.first and system -%}"
        r"{{- bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + (message['content'] | trim) + ' [/INST]' -}}"
        r"{%- else -%}{{- bos_token + '[INST] ' + (message['content'] | trim) + ' [/INST]' -}}{%- endif -%}"
        r"{%- else -%}{{- ' ' + (message['content'] | trim) + ' ' + eos_token -}}{%- endif -%}"
        r"{%- endfor -%}"),
    "mistral": (
        _SYSTEM_SPLIT
        + r"{{- bos_token -}}"
        r"{%- for message in rest -%}" + _ALTERNATE.replace("%s", "mistral")
        + r"{%- if message['role'] == 'user' -%}"
        r"{%- if loop.first and system -%}{{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' -}}"
        r"{%- else -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
        r"{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
        r"{%- endfor -%}"),
    "alpaca": (
        _SYSTEM_SPLIT
        + r"{%- if system -%}{{- (system | trim) + '\n\n' -}}{%- endif -%}"
        r"{%- for message in rest -%}"
        r"{%- if message['role'] == 'user' -%}{{- '### Instruction:\n' + (message['content'] | trim) + '\n\n' -}}"
        r"{%- elif message['role'] == 'assistant' -%}"
        r"{{- '### Response:\n' + (message['content'] | trim) + eos_token + '\n\n' -}}"
        r"{%- else -%}{{- raise_exception('alpaca: roles are system (first only), user and assistant') -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"),
    "vicuna": (
        _SYSTEM_SPLIT
        + r"{%- if system -%}{{- (system | trim) + '\n\n' -}}{%- endif -%}"
        r"{%- for message in rest -%}"
        r"{%- if message['role'] == 'user' -%}{{- 'USER: ' + (message['content'] | trim) + '\n' -}}"
        r"{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + (message['content'] | trim) + eos_token + '\n' -}}"
        r"{%- else -%}{{- raise_exception('vicuna: roles are system (first only), user and assistant') -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"),
    "zephyr": (
        r"{%- for message in messages -%}"
        r"{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"),
    "phi3": (
        r"{%- for message in messages -%}"
        r"{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"),
    "gemma": (
        _SYSTEM_SPLIT
        + r"{{- bos_token -}}"
        r"{%- for message in rest -%}" + _ALTERNATE.replace("%s", "gemma")
        + r"{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        r"{%- set content = (system + '\n\n' + message['content']) if (loop.first and system) else message['content'] -%}"
        r"{{- '<start_of_turn>' + role + '\n' + (content | trim) + '<end_of_turn>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"),
    "exaone": (
        r"{%- for message in messages -%}"
        r"{%- if message['role'] == 'system' -%}{{- '[|system|]' + message['content'] + '[|endofturn|]\n' -}}"
        r"{%- elif message['role'] == 'user' -%}{{- '[|user|]' + message['content'] + '\n' -}}"
        r"{%- elif message['role'] == 'assistant' -%}{{- '[|assistant|]' + message['content'] + '[|endofturn|]\n' -}}"
        r"{%- else -%}{{- raise_exception('exaone: roles are system, user and assistant') -}}{%- endif -%}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"),
}
"""Template name -> Jinja text (``chatml``, ``llama3``, ``alpaca``, ``mistral``, ``zephyr`` ...)."""


def _is_name(value: str) -> bool:
    """mergekit's rule: a short single-line value without ``{`` is looked up as a template name."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def named_chat_template(value: str) -> Optional[str]:
    """The template a config's ``chat_template`` value stands for: a named template's text, or the value.

    Args:
      value: a template name, ``auto`` or a literal Jinja template.

    Returns:
      The Jinja text; None for ``auto`` (resolved from the input models when the output is written).

    Raises:
      ValueError: the value is neither (see :func:`chat_template_problem`).

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``chat_template``.
    """
    problem = chat_template_problem(value)
    if problem:
        raise ValueError(problem)
    if value == AUTO:
        return None
    return CHAT_TEMPLATES[value] if _is_name(value) else value


def chat_template_problem(value: str) -> Optional[str]:
    """Why a ``chat_template`` value is unusable, or None when it is a name, ``auto`` or a template.

    References: Goddard et al., "Arcee's MergeKit" (EMNLP 2024 industry track), ``chat_template``.
    """
    if value == AUTO or (_is_name(value) and value in CHAT_TEMPLATES):
        return None
    if "{" not in value:
        return (f"unknown chat template {value!r}; give a name ({', '.join(sorted(CHAT_TEMPLATES))}), 'auto' (the "
                "template most input models use) or a Jinja template.")
    return None
