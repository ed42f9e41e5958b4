"""Exports that the other side's own tools read: the Hugging Face layout.

transformers' `AutoTokenizer`, `apply_chat_template` and `generate` on a folder written by
`save_text_model(..., "hf")` / `herd convert --to hf` agree with herd's tokenizer, `ChatFormat` and
`generate`. The Meta layout against llama-models' reference code: test_export_meta_interop.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from herd.cli import main as convert_main
from herd.text.args import ModelArgs, get_preset
from herd.text.chat_format import ChatFormat, Message
from herd.text.checkpoint_meta import CheckpointError
from herd.text.generation import SamplingParams, generate
from herd.text.loading import convert_checkpoint, save_text_model
from herd.text.model import build_llama
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The herd of llamas crossed the Andes.",
    "  leading spaces,\n\n\ttabs\t\tand   runs of    spaces   ",
    "digits 1234567890, 3.14159, 1,000,000 and 2024-07-23",
    "unicode: héllo wörld, naïve café, 日本語のテキスト, 한국어 리뷰, emoji 🦙🐪, math ∑∫√",
    "special strings as text: <|eot_id|> <|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    "don't I'LL we've THEY'RE it's",
    "\n\n\n",
    "",
    "code:\n    def f(x):\n        return x ** 2  # square\r\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()  # the real Llama 3 tokenizer.model shipped in llama-models


# --- Hugging Face layout -------------------------------------------------------------------------------------
CHAIN = (1000, 2000, 3000)  # greedy decoding walks 1000 → 2000 → 3000 → stop token


def chain_model(stop: int) -> torch.nn.Module:
    """A tiny random Llama with the full 128,256 vocabulary whose greedy decoding, from a prompt ending in
    CHAIN[0], writes CHAIN[1], CHAIN[2] and then `stop`: each chain token's embedding is a large basis
    vector and the next token's output row points along it, so its logit beats every random row."""
    torch.manual_seed(0)
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128)
    model = build_llama(args)
    with torch.no_grad():
        for i, (tok, nxt) in enumerate(zip(CHAIN, (*CHAIN[1:], stop))):
            model.tok_embeddings.weight[tok] = 0.0
            model.tok_embeddings.weight[tok, i] = 30.0
            model.output.weight[nxt] = 0.0
            model.output.weight[nxt, i] = 5.0
    return model.eval()


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tokenizer):
    """(folder, herd model): the chain model ending in <|eot_id|>, exported with fmt="hf"."""
    model = chain_model(tokenizer.eot_id)
    out = tmp_path_factory.mktemp("hf") / "model"
    save_text_model(model.state_dict(), model.args, tokenizer, out, "hf")
    return out, model


@pytest.fixture(scope="module")
def hf_tok(hf_export):
    return transformers.AutoTokenizer.from_pretrained(hf_export[0])


def test_hf_export_holds_meta_repository_files(hf_export, tokenizer) -> None:
    out, model = hf_export
    names = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
    names |= {"special_tokens_map.json", "generation_config.json"}
    assert names <= {f.name for f in out.iterdir()}
    stops = [tokenizer.eos_id, tokenizer.eom_id, tokenizer.eot_id]
    assert stops == [128001, 128008, 128009]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, stops)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 128000, "eos_token_id": stops, "pad_token_id": 128004}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    decoder = tok_config["added_tokens_decoder"]
    assert len(decoder) == 256 and decoder["128009"]["content"] == "<|eot_id|>"
    assert all(v["special"] and not v["normalized"] for v in decoder.values())
    assert {int(k): v["content"] for k, v in decoder.items()} == {
        i: name for name, i in tokenizer.special_tokens.items()
    }
    assert tok_config["model_max_length"] == model.args.max_seq_len
    # transformers' own classes read the same ids back
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == stops
    assert transformers.AutoConfig.from_pretrained(out).bos_token_id == 128000


def test_autotokenizer_ids_equal_herd(hf_tok, tokenizer) -> None:
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
    )
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (128000, 128001, 128004)
    assert len(hf_tok) == 128_256
    for text in TEXTS:
        ours = tokenizer.encode(text, bos=True)
        # herd encodes special-token strings as plain text; transformers does so with split_special_tokens
        assert hf_tok(text, split_special_tokens=True)["input_ids"] == ours, text
        # transformers' default turns them into special ids, as herd does with allowed_special="all"
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text, bos=True, allowed_special="all"), text
        assert hf_tok.decode(ours) == tokenizer.decode(ours), text
    long = "word " * 3000 + "x" * 5000  # long inputs and long runs (herd cuts runs over 25k chars only)
    assert hf_tok(long)["input_ids"] == tokenizer.encode(long, bos=True)
    batch = hf_tok(TEXTS[:3], padding=True)["input_ids"]  # a pad token makes batches work
    assert len({len(row) for row in batch}) == 1 and 128004 in batch[2] + batch[0] + batch[1]


def _chat_ids(hf_tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


SEARCH = {"name": "brave_search", "arguments": {"query": "Llama 3 release date"}}
DIALOGS = {
    "user only": [Message("user", "What is 2+2?")],
    "system user assistant": [
        Message("system", "You are a helpful assistant. Answer briefly."),
        Message("user", "Name three camelids."),
        Message("assistant", "Llama, alpaca and camel."),
        Message("user", "And a fourth?  "),
    ],
    "multi-turn unicode": [
        Message("user", "Traduis « bonjour » en 日本語."),
        Message("assistant", "こんにちは (konnichiwa)."),
        Message("user", "Merci !\n\n- et en coréen ?"),
    ],
    "built-in tool call": [
        Message("system", "Environment: ipython\nTools: brave_search"),
        Message("user", "When was Llama 3 released?"),
        Message("assistant", "", tool_calls=[SEARCH]),
        Message("tool", "April 18, 2024"),
        Message("assistant", "It was released on April 18, 2024."),
    ],
    "code interpreter": [
        Message("user", "Compute 2**10."),
        Message("assistant", "", tool_calls=[{"name": "python", "arguments": {"code": "print(2**10)"}}]),
        Message("ipython", "1024"),
    ],
    "custom tool json": [
        Message("user", "Weather in Seoul?"),
        Message(
            "assistant",
            "",
            tool_calls=[{"name": "get_weather", "arguments": {"city": "Seoul", "days": 3, "units": None}}],
        ),
        Message("ipython", '{"temp": 21}'),
    ],
    "explicit stop reason": [
        Message("user", "Hi"),
        Message("assistant", "Let me check", stop_reason="end_of_message"),
    ],
}


def _as_hf(message: Message, hf_style: bool) -> dict:
    d: dict = {"role": "tool" if message.role == "ipython" and hf_style else message.role}
    d["content"] = message.content
    if message.tool_calls:
        calls = [dict(c) for c in message.tool_calls]
        d["tool_calls"] = [{"type": "function", "function": c} for c in calls] if hf_style else calls
    if message.stop_reason is not None:
        d["stop_reason"] = message.stop_reason
    return d


@pytest.mark.parametrize("name", list(DIALOGS))
def test_chat_template_equals_chat_format(hf_tok, tokenizer, name: str) -> None:
    fmt = ChatFormat(tokenizer)
    dialog = DIALOGS[name]
    for add_generation_prompt in (False, True):
        ours = fmt.encode_dialog_prompt(dialog, add_generation_prompt=add_generation_prompt)
        for hf_style in (False, True):  # herd's {"name", "arguments"} and OpenAI-style tool calls
            messages = [_as_hf(m, hf_style) for m in dialog]
            theirs = _chat_ids(hf_tok, messages, add_generation_prompt)
            assert theirs == ours, (name, add_generation_prompt, hf_style, tokenizer.decode(theirs))
    if name == "built-in tool call":  # the template really took the tool-call path
        assert ours.count(tokenizer.python_tag_id) == 1 and ours.count(tokenizer.eom_id) == 1


def test_chat_template_text_equals_chat_format_where_ids_cannot(hf_tok, tokenizer) -> None:
    """The documented limits: transformers tokenizes the rendered string as one text, herd encodes the
    header's "\\n\\n", the content and each tool call apart. The rendered text is still herd's."""
    fmt = ChatFormat(tokenizer)
    call = {"name": "brave_search", "arguments": {"query": "x"}}
    for dialog in (
        [Message("user", "\nstarts with a line break")],
        [Message("assistant", "Looking.", tool_calls=[call])],
    ):
        ours = fmt.encode_dialog_prompt(dialog, add_generation_prompt=False)
        messages = [_as_hf(m, hf_style=False) for m in dialog]
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        assert text == tokenizer.decode(ours)
        assert _chat_ids(hf_tok, messages, False) != ours  # merged BPE pieces, as the docs say


def test_chat_template_rejects_what_herd_rejects(hf_tok) -> None:
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="unknown message role"):
        _chat_ids(hf_tok, [{"role": "narrator", "content": "x"}], False)
    with pytest.raises(TemplateError, match="only assistant messages carry tool calls"):
        _chat_ids(hf_tok, [{"role": "user", "content": "", "tool_calls": [SEARCH]}], False)
    with pytest.raises(ValueError):
        Message("narrator", "x")


@torch.no_grad()
def test_exported_logits_equal_transformers(hf_export, tokenizer) -> None:
    out, model = hf_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.float32
    ids = torch.tensor([tokenizer.encode(TEXTS[3], bos=True)])
    diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-5, f"max |logits diff| = {diff:.3e}"


@pytest.mark.parametrize("stop", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_generate_stops_where_herd_stops(tmp_path, tokenizer, stop: str) -> None:
    """transformers' greedy `generate`, told nothing about stop ids, stops where herd's `generate` with
    the tokenizer's stop ids stops: it reads them from generation_config.json."""
    stop_id = tokenizer.special_tokens[stop]
    model = chain_model(stop_id)
    save_text_model(model.state_dict(), model.args, tokenizer, tmp_path, "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [*tokenizer.encode("Count along:", bos=True), CHAIN[0]]
    ours = generate(model, [prompt], SamplingParams(max_new_tokens=12), stop_ids=tokenizer.stop_ids)[0]
    assert (ours.tokens, ours.stop_token) == (list(CHAIN[1:]), stop_id)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    assert theirs.tolist() == [*ours.tokens, ours.stop_token]  # stopped at the same token, not at 12


def test_subset_vocabulary_is_refused_for_hf(tmp_path, tokenizer) -> None:
    subset = SubsetTokenizer.from_texts(tokenizer, ["the quick brown fox"])
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=subset.vocab_size, multiple_of=32)
    state = build_llama(args).state_dict()
    out = tmp_path / "run" / "model"
    with pytest.raises(ValueError, match="trimmed vocabulary") as e:
        save_text_model(state, args, subset, out, "hf")
    assert str(out) in str(e.value) and 'export_format = "meta"' in str(e.value)
    assert not out.exists()  # refused before anything was written
    save_text_model(state, args, subset, out, "meta")  # the Meta layout keeps the subset
    assert (out / "vocab_subset.json").is_file()
    with pytest.raises(CheckpointError, match=r"vocab_subset\.json: .*trimmed vocabulary"):
        convert_checkpoint(out, tmp_path / "hf", dst_format="hf")


def test_convert_meta_to_hf_writes_the_same_tokenizer_files(tmp_path, hf_export, tokenizer, capsys) -> None:
    ref, model = hf_export
    meta, hf_dir = tmp_path / "meta", tmp_path / "hf"
    save_text_model(model.state_dict(), model.args, tokenizer, meta, "meta")
    assert not (meta / "tokenizer.json").exists()
    assert convert_main(["convert", "--to", "hf", str(meta), str(hf_dir)]) == 0
    assert "tokenizer.json" in capsys.readouterr().out  # listed among the files carried / derived
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (hf_dir / name).read_bytes() == (ref / name).read_bytes(), name
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings"):
        got = json.loads((hf_dir / "config.json").read_text())[key]
        assert got == json.loads((ref / "config.json").read_text())[key], key
