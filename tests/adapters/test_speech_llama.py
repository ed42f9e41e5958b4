"""The composed speech model: audio rows stand exactly where the placeholders are (equal to feeding the LLM
the same embeddings by hand), a padded batch equals each clip alone, decoding with a bound clip equals
greedy decoding by full forwards, the LLM stays frozen, and the checkpoint round-trips."""

from __future__ import annotations

import hashlib

import pytest
import torch

from herd.adapters import SpeechLlama, generate_with_audio, place_audio
from herd.adapters.speech import get_speech_adapter_preset
from herd.adapters.speech_io import load_speech_model, read_speech_config, save_speech_model
from herd.speech.conformer import ConformerEncoder
from herd.speech.conformer_args import get_speech_preset
from herd.text import build_llama, get_preset
from herd.text.generation import SamplingParams
from herd.text.loading import save_text_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0) -> SpeechLlama:
    torch.manual_seed(seed)
    llm = build_llama(get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320,
                                 multiple_of=16, max_seq_len=128))  # fmt: skip
    encoder = ConformerEncoder(get_speech_preset("tiny", dim=32, n_layers=1, ffn_dim=64))
    encoder.init_weights()
    adapter = get_speech_adapter_preset("tiny", encoder_dim=32, dim=48, ffn_dim=64, llm_dim=64)
    model = SpeechLlama(llm, encoder, adapter)
    model.adapter.init_weights()
    return model.eval()


def prompt(model: SpeechLlama, frames: int, head: list[int], tail: list[int]) -> list[int]:
    return [*head, *[model.audio_token_id] * model.audio_tokens(frames), *tail]


def test_audio_rows_replace_the_placeholders_and_nothing_else():
    model = tiny_model()
    feats = torch.randn(2, 50, 80)
    lengths = torch.tensor([50, 31])
    rows = [prompt(model, 50, [1, 5, 6], [7, 8]), prompt(model, 31, [1], [9, 10, 11, 12])]
    S = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (S - len(r)) for r in rows])
    with torch.no_grad():
        logits = model(tokens, feats, lengths)
        embeds, n = model.encode_audio(feats, lengths)
        assert n.tolist() == [model.audio_tokens(50), model.audio_tokens(31)] == [7, 4]
        by_hand = model.llm.embed(tokens.masked_fill(tokens == model.audio_token_id, 0)).clone()
        for b, start in ((0, 3), (1, 1)):
            by_hand[b, start : start + int(n[b])] = embeds[b, : int(n[b])]
        assert torch.equal(logits, model.llm(input_embeds=by_hand))
    # without audio the model is the LLM itself
    text = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(text), model.llm(text))


def test_placeholder_runs_must_match_the_clips():
    embeds, lengths = torch.randn(2, 4, 8), torch.tensor([4, 2])
    values, mask = place_audio(
        torch.tensor([[1, 99, 99, 99, 99, 2], [99, 99, 3, 0, 0, 0]]), embeds, lengths, 99
    )
    assert (
        mask.sum() == 6
        and torch.equal(values[1, :2], embeds[1, :2])
        and torch.equal(values[0, 1:5], embeds[0])
    )
    with pytest.raises(ValueError, match="placeholder runs of lengths \\[3, 2\\]"):
        place_audio(torch.tensor([[1, 99, 99, 99, 2, 2], [99, 99, 3, 0, 0, 0]]), embeds, lengths, 99)
    model = tiny_model()
    with pytest.raises(ValueError, match="no audio was given"):
        model(torch.tensor([[1, model.audio_token_id, 2]]))


def test_a_padded_batch_equals_each_clip_alone():
    model = tiny_model()
    feats = torch.randn(2, 60, 80)
    lengths = torch.tensor([60, 23])
    rows = [prompt(model, 60, [1, 4], [5]), prompt(model, 23, [1, 4], [5, 6, 7])]
    S = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (S - len(r)) for r in rows])
    with torch.no_grad():
        batched = model(tokens, feats, lengths)
        for b in range(2):
            L, n = len(rows[b]), int(lengths[b])
            alone = model(torch.tensor([rows[b]]), feats[b : b + 1, :n], lengths[b : b + 1])
            torch.testing.assert_close(batched[b : b + 1, :L], alone, atol=1e-5, rtol=0)


def test_decoding_with_bound_audio_equals_greedy_full_forwards():
    model = tiny_model(1)
    feats = torch.randn(3, 40, 80)
    lengths = torch.tensor([40, 17, 29])
    prompts = [prompt(model, int(n), [1, 2 + b], [3] * b) for b, n in enumerate(lengths.tolist())]
    done = generate_with_audio(model, prompts, feats, lengths, SamplingParams(max_new_tokens=6))
    for b, p in enumerate(prompts):
        seq = list(p)
        n = int(lengths[b])
        for _ in range(6):  # no cache: the whole sequence each step
            with torch.no_grad():
                logits = model(torch.tensor([seq]), feats[b : b + 1, :n], lengths[b : b + 1])
            seq.append(int(logits[0, -1].argmax()))
        assert done[b].tokens == seq[len(p) :]
    assert model._bound is None  # generate_with_audio unbinds


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_the_llm_stays_frozen_while_encoder_and_adapter_train():
    model = tiny_model().train()
    frozen, encoder, adapter = digest(model.llm), digest(model.encoder), digest(model.adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.llm.parameters()) and trainable
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    feats = torch.randn(2, 40, 80)
    tokens = torch.tensor([prompt(model, 40, [1], [5, 6])] * 2)
    for _ in range(3):
        logits = model(tokens, feats)
        torch.nn.functional.cross_entropy(logits[:, -3:-1].flatten(0, 1), tokens[:, -2:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert digest(model.llm) == frozen
    assert digest(model.encoder) != encoder and digest(model.adapter) != adapter
    model.freeze_encoder()
    assert all(p.requires_grad for p in model.adapter.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(2)
    tok = SubsetTokenizer.from_texts(Tokenizer(), ["repeat after me red green blue"])
    save_text_model(model.llm.state_dict(), model.llm.args, tok, tmp_path / "llm", "meta")
    out = save_speech_model(model, tmp_path / "llm", tmp_path / "speech")
    assert {p.name for p in out.iterdir()} == {"speech.json", "speech_adapter.safetensors"}
    loaded, tokenizer, config = load_speech_model(out)
    assert config["adapter_args"] == model.adapter.args and tokenizer.vocab_size == tok.vocab_size
    feats = torch.randn(1, 30, 80)
    tokens = torch.tensor([prompt(model, 30, [1], [4])])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, feats), model(tokens, feats))
    (out / "speech.json").write_text('{"llm": "x"}')
    with pytest.raises(ValueError, match="missing encoder_args, adapter_args"):
        read_speech_config(out)
    with pytest.raises(FileNotFoundError, match="not a speech checkpoint"):
        read_speech_config(tmp_path)


def test_static_cache_and_compiled_steps_equal_eager():
    """Speech decodes on the static cache (`STATIC_STEPS`) and with the compiled steps (traced by dynamo,
    `backend="eager"`) token for token as eagerly. The prompts are ragged and row 1's clip comes late, so
    decode steps still inside row 1's prompt read its bound audio rows at tensor positions."""
    from herd.adapters.speech_llama import generate_with_audio
    from herd.fast_decode import compiled_steps
    from herd.text.generation import STATIC_STEPS, generate

    torch._dynamo.reset()
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 40, 80, generator=g)
    lengths = torch.tensor([40, 24])
    # row 0: 8 tokens, row 1: 16 with its 3 placeholders at 12..14, fed by decode steps 8..15
    rows = [prompt(model, 40, [1, 5], [7]), prompt(model, 24, [1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [3])]
    assert [len(r) for r in rows] == [8, 16] and rows[1][12:15] == [model.audio_token_id] * 3
    params = SamplingParams(max_new_tokens=5)
    eager = generate_with_audio(model, rows, feats, lengths, params)
    assert generate_with_audio(model, rows, feats, lengths, params, steps=STATIC_STEPS) == eager
    steps = compiled_steps(model, backend="eager", bucket=32)
    assert generate_with_audio(model, rows, feats, lengths, params, steps=steps) == eager
    # the audio mattered: the placeholders alone (no clip bound) are refused, other clips give other tokens
    other = generate_with_audio(model, rows, torch.randn(2, 40, 80, generator=g), lengths, params)
    assert [c.tokens for c in other] != [c.tokens for c in eager]
    with pytest.raises(ValueError, match="no audio was given"):
        generate(model, rows, params)
