"""Hugging Face tokenizer files for the Llama 3 tokenizer, laid out as Meta's own HF repositories.

A checkpoint folder that transformers, lm-eval, vLLM or TGI can use needs more than the weights:

    tokenizer.json            a fast (Rust `tokenizers`) BPE built from the tiktoken ranks, BOS prepended
    tokenizer_config.json     the 256 special tokens, bos/eos/pad, the chat template
    special_tokens_map.json   bos/eos/pad again (older readers look here)
    generation_config.json    bos id and the stop ids [<|end_of_text|>, <|eom_id|>, <|eot_id|>]

The BPE is converted by transformers' own `TikTokenConverter` (so the merges are the ones transformers
derives for Meta's repositories); herd checks afterwards that every special token got herd's id.

The chat template renders herd's `ChatFormat` (text/chat_format.py): no default system prompt, content
untrimmed, `<|python_tag|>` before a built-in tool call, `<|eom_id|>` after one. Limits that no template
can lift, because transformers tokenizes the rendered string as one text while herd (like Meta's
reference ChatFormat) encodes the header's "\\n\\n", the content and each tool call separately:
content that starts with a line break, or content followed by tool-call text in the same message, can
merge into different BPE tokens; special-token strings inside content become special tokens. Custom tool
calls use the JSON format only, and transformers' `tojson` writes non-ASCII arguments unescaped.

`eos_token` is `<|end_of_text|>` as in Meta's base repositories (herd's `tokenizer.eos_id`, what data
pipelines append); stopping at `<|eot_id|>` comes from the eos list in config.json/generation_config.json,
which transformers' `generate`, vLLM and TGI all read. `pad_token` is `<|finetune_right_pad_id|>`, the
token herd pads with, so batched tokenization works; `clean_up_tokenization_spaces` is false so that
`decode` gives herd's text.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

from herd.text.tokenizer import Tokenizer, _load_ranks

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
HF_TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"

# One line per construct; `{%-`/`-%}` strip the template's own whitespace in any Jinja environment.
CHAT_TEMPLATE = "".join(
    [
        "{%- set builtin_tools = ['brave_search', 'wolfram_alpha', 'photogen', 'code_interpreter'] -%}",
        "{%- if tools -%}",
        "{{- raise_exception('herd chat template: describe tools in the system message text; "
        "the tools argument is not rendered') -}}",
        "{%- endif -%}",
        "{{- bos_token -}}",
        "{%- for message in messages -%}",
        "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}",
        "{%- if role not in ['system', 'user', 'assistant', 'ipython'] -%}",
        "{{- raise_exception('unknown message role ' ~ role ~ '; expected system, user, assistant, "
        "ipython or tool') -}}",
        "{%- endif -%}",
        "{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and "
        "message['tool_calls'] else [] -%}",
        "{%- if calls and role != 'assistant' -%}",
        "{{- raise_exception('only assistant messages carry tool calls') -}}",
        "{%- endif -%}",
        # Which built-in tools are called decides <|python_tag|> (first call) and <|eom_id|> (any call).
        "{%- set ns = namespace(tag=false, eom=false) -%}",
        "{%- for item in calls -%}",
        "{%- set call = item['function'] if item['function'] is defined else item -%}",
        "{%- set name = 'code_interpreter' if call['name'] == 'python' else call['name'] -%}",
        "{%- if name in builtin_tools -%}",
        "{%- set ns.eom = true -%}",
        "{%- if loop.first -%}{%- set ns.tag = true -%}{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{{- '<|start_header_id|>' ~ role ~ '<|end_header_id|>\\n\\n' -}}",
        "{%- if ns.tag -%}{{- '<|python_tag|>' -}}{%- endif -%}",
        "{%- if message['content'] is string -%}",
        "{{- message['content'] -}}",
        "{%- elif message['content'] is iterable -%}",
        "{%- for part in message['content'] -%}",
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- for item in calls -%}",
        "{%- set call = item['function'] if item['function'] is defined else item -%}",
        "{%- set name = 'code_interpreter' if call['name'] == 'python' else call['name'] -%}",
        "{%- set arguments = call['arguments'] if call['arguments'] is defined else {} -%}",
        "{%- if arguments is string -%}",
        "{{- raise_exception('tool call ' ~ name ~ ': arguments must be an object, not a JSON string') -}}",
        "{%- endif -%}",
        "{%- if name in ['brave_search', 'wolfram_alpha', 'photogen'] -%}",
        "{{- name ~ '.call(query=\"' ~ arguments['query'] ~ '\")' -}}",
        "{%- elif name == 'code_interpreter' -%}",
        "{{- arguments['code'] -}}",
        "{%- else -%}",
        "{{- {'type': 'function', 'name': name, 'parameters': arguments} | tojson -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- set stop = message['stop_reason'] if message['stop_reason'] is defined else none -%}",
        "{%- if role == 'assistant' and (stop == 'end_of_message' or (stop is none and ns.eom)) -%}",
        "{{- '<|eom_id|>' -}}",
        "{%- else -%}",
        "{{- '<|eot_id|>' -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
        "{%- endif -%}",
    ]
)


def hf_token_ids(tokenizer: Any) -> dict[str, Any]:
    """bos/eos ids for config.json and generation_config.json; eos is the list of stop ids when the
    tokenizer has several (Llama 3: end_of_text, eom, eot), as in Meta's instruct repositories."""
    stops = sorted(getattr(tokenizer, "stop_ids", ()) or {tokenizer.eos_id})
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0]}


def build_fast_tokenizer(tokenizer: Tokenizer) -> Any:
    """A `tokenizers.Tokenizer` that splits text as `tokenizer` does and prepends `<|begin_of_text|>`."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from herd.text.tokenizer import LLAMA3_PATTERN

    ranks = _load_ranks(tokenizer.path)  # validated by herd's reader (ranks 0..n-1, errors name the file)

    class _HerdRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:  # type: ignore[override]
            return ranks

    names = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
    fast = _HerdRanks(vocab_file=str(tokenizer.path), pattern=LLAMA3_PATTERN).converted()
    # Added here rather than through the converter, whose keyword for them changed between transformers 4
    # and 5; `normalized=False` keeps them matched verbatim, `special=True` lets decode skip them.
    fast.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in names])
    wrong = [n for n in names if fast.token_to_id(n) != tokenizer.special_tokens[n]]
    if wrong or fast.get_vocab_size() != tokenizer.vocab_size:
        raise ValueError(
            f"{tokenizer.path}: the converted tokenizer numbers its tokens differently from herd's "
            f"(vocab {fast.get_vocab_size()} vs {tokenizer.vocab_size}; special tokens off: {wrong[:3]})"
        )
    # Meta's repositories add BOS in the post-processor, so `tokenizer(text)` gives what herd's
    # `encode(text, bos=True)` gives; ByteLevel stays first so offsets keep working.
    fast.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A:0",
                pair=f"{BOS} $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, tokenizer.bos_id)],
            ),
        ]
    )
    return fast


def _token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json in the layout of Meta's repositories (see the module docstring for choices)."""
    decoder = {
        str(i): {**_token_entry(name), "special": True}
        for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def generation_config(tokenizer: Any) -> dict[str, Any]:
    """Stop ids and padding for `generate`; no sampling defaults, so it decodes greedily like `herd generate`."""
    config = hf_token_ids(tokenizer)
    if getattr(tokenizer, "pad_id", -1) >= 0:
        config["pad_token_id"] = tokenizer.pad_id
    return config


def write_hf_tokenizer(
    tokenizer: Tokenizer,
    out_dir: str | PathLike,
    model_max_length: int,
    generation: bool = True,
) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and (if `generation`)
    generation_config.json into `out_dir`; returns the files written."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"write_hf_tokenizer needs a Llama 3 tiktoken Tokenizer, got {type(tokenizer).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_fast_tokenizer(tokenizer).save(str(out / TOKENIZER_JSON))
    files = {
        TOKENIZER_CONFIG: tokenizer_config(tokenizer, model_max_length),
        SPECIAL_TOKENS_MAP: {
            "bos_token": _token_entry(BOS),
            "eos_token": _token_entry(EOS),
            "pad_token": _token_entry(PAD),
        },
    }
    if generation:
        files[GENERATION_CONFIG] = generation_config(tokenizer)
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return [out / TOKENIZER_JSON, *(out / name for name in files)]


def refuse_subset_vocabulary(tokenizer: Any, out_dir: str | PathLike) -> None:
    """Raise for a model trained on a trimmed vocabulary (`SubsetTokenizer`): no Hugging Face tokenizer
    can reproduce it. herd runs the full Llama 3 BPE and maps tokens outside the subset to one unknown
    id; a BPE over only the kept tokens would split text into other pieces (its merges cannot reach the
    dropped tokens) and give the model ids it never saw, and `tokenizers` has no id-remapping step."""
    from herd.text.vocab_subset import SubsetTokenizer

    if isinstance(tokenizer, SubsetTokenizer):
        raise ValueError(
            f"{Path(out_dir)}: cannot write a Hugging Face checkpoint for a model trained on a trimmed "
            f"vocabulary ({tokenizer.vocab_size} of {tokenizer.base.vocab_size} Llama 3 tokens, "
            "model.vocab_subset): no Hugging Face tokenizer maps text to those ids the way herd's "
            'SubsetTokenizer does. Set checkpoint.export_format = "meta" (herd reads it back with '
            "vocab_subset.json), or train on the full vocabulary to export for transformers."
        )


__all__ = [
    "CHAT_TEMPLATE",
    "GENERATION_CONFIG",
    "HF_TOKENIZER_FILES",
    "build_fast_tokenizer",
    "generation_config",
    "hf_token_ids",
    "refuse_subset_vocabulary",
    "tokenizer_config",
    "write_hf_tokenizer",
]
