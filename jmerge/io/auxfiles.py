"""Auxiliary files of a HF model dir (config, tokenizer) and the model card."""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Sequence

from .errors import CheckpointError

__all__ = ["AUX_FILE_PATTERNS", "copy_aux_files", "model_card"]

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template*",
)
CARD_FILES = ("README.md", "mergekit_config.yml")
AUX_FILE_PATTERNS = CONFIG_FILES + TOKENIZER_PATTERNS


def _matching(src_dir: str, patterns: Sequence[str]) -> list[str]:
    names = sorted(os.listdir(src_dir))
    return [n for n in names if os.path.isfile(os.path.join(src_dir, n))
            and any(fnmatch.fnmatch(n, p) for p in patterns)]


def copy_aux_files(src_dir: str | os.PathLike, writer: Any, *, tokenizer_source: str | os.PathLike | None = None,
                   config: bool = True, tokenizer: bool = True, card: bool = False) -> list[str]:
    """Copy config and tokenizer files into a writer's output.

    Args:
      src_dir: the model dir to copy ``config.json`` / ``generation_config.json`` from (usually the
        base model), and the tokenizer files unless ``tokenizer_source`` is given.
      writer: a :class:`CheckpointWriter` (anything with ``add_file(src, relname)``).
      tokenizer_source: another dir to take the tokenizer files (``tokenizer.json``,
        ``tokenizer_config.json``, ``tokenizer.model``, ``special_tokens_map.json``, vocab/merges files,
        ``chat_template*``) from.
      config: copy the config files.
      tokenizer: copy the tokenizer files.
      card: copy the model card and the merge config (``README.md``, ``mergekit_config.yml``), as a
        format conversion does.

    Returns:
      The names of the files copied.

    Raises:
      CheckpointError: ``src_dir`` or ``tokenizer_source`` is not a directory.

    References: the Hugging Face Transformers model-directory layout
    (``save_pretrained``: config and tokenizer files).
    """
    src_dir = os.fspath(src_dir)
    if not os.path.isdir(src_dir):
        raise CheckpointError(f"{src_dir}: not a directory; cannot copy config/tokenizer files from it")
    tok_dir = os.fspath(tokenizer_source) if tokenizer_source is not None else src_dir
    if not os.path.isdir(tok_dir):
        raise CheckpointError(f"{tok_dir}: tokenizer_source is not a directory")
    copied = []
    if config:
        for n in _matching(src_dir, CONFIG_FILES):
            writer.add_file(os.path.join(src_dir, n), n)
            copied.append(n)
    if tokenizer:
        for n in _matching(tok_dir, TOKENIZER_PATTERNS):
            writer.add_file(os.path.join(tok_dir, n), n)
            copied.append(n)
    if card:
        for n in _matching(src_dir, CARD_FILES):
            writer.add_file(os.path.join(src_dir, n), n)
            copied.append(n)
    return copied


def model_card(config_yaml: str, method: str, models: list[str]) -> str:
    """README.md text for a merged model: method, inputs and the exact configuration used.

    Args:
      config_yaml: the merge configuration (YAML text) as run.
      method: the merge method name.
      models: the input model paths or ids.

    Returns:
      Markdown text naming jmerge and its version.

    References: Hugging Face model cards; Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019).
    """
    from ..version import __version__

    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- jmerge",
        "---",
        "# Merged model",
        "",
        f"This model was merged with [jmerge](https://github.com/jmerge/jmerge) {__version__} "
        f"using the `{method}` method.",
        "",
        "## Models merged",
        "",
    ]
    lines += [f"- {m}" for m in models] or ["- (none listed)"]
    lines += ["", "## Configuration", "", "The following configuration was used:", "", "```yaml",
              config_yaml.rstrip("\n"), "```", ""]
    return "\n".join(lines)
