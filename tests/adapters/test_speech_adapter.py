"""The speech adapter: the paper's size, 80 ms output lengths, padding invariance, splicing into the LLM's
input embeddings, and a frozen LLM that an adapter step leaves unchanged."""

from __future__ import annotations

import pytest
import torch

from herd.adapters.speech import (
    SPEECH_ADAPTER_PRESET_NAMES,
    SpeechAdapter,
    SpeechAdapterArgs,
    get_speech_adapter_preset,
    splice_audio,
)
from herd.speech.conformer import ConformerEncoder
from herd.speech.conformer_args import get_speech_preset
from herd.text import build_llama, get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAPER_ADAPTER_PARAMS = 102_248_448  # speech_adapter_8b, counted on the meta device


def test_the_papers_adapter_is_about_100m_parameters():
    args = get_speech_adapter_preset("speech_adapter_8b")
    assert (args.encoder_dim, args.dim, args.ffn_dim, args.conv_kernel, args.conv_stride) == (
        1536,
        3072,
        4096,
        3,
        2,
    )
    with torch.device("meta"):
        adapter = SpeechAdapter(args)
    built = sum(p.numel() for p in adapter.parameters())
    print(f"speech adapter (paper, into Llama 3 8B): {built:,} parameters")
    assert built == args.num_params() == PAPER_ADAPTER_PARAMS
    assert 90e6 < built < 115e6  # the paper: "about 100M"
    # into the 70B (8192 wide) only the last projection grows: 3072 × 4096 more weights
    assert SpeechAdapterArgs(llm_dim=8192).num_params() == PAPER_ADAPTER_PARAMS + 3072 * 4096
    for name in SPEECH_ADAPTER_PRESET_NAMES:
        with torch.device("meta"):
            n = sum(p.numel() for p in SpeechAdapter(get_speech_adapter_preset(name)).parameters())
        assert n == get_speech_adapter_preset(name).num_params(), name
    with pytest.raises(ValueError, match="heads"):
        SpeechAdapterArgs(dim=100, n_heads=3)
    with pytest.raises(KeyError, match="tiny"):
        get_speech_adapter_preset("huge")


def test_output_lengths_halve_the_encoder_frames():
    torch.manual_seed(0)
    adapter = SpeechAdapter(get_speech_adapter_preset("tiny")).eval()
    lengths = torch.tensor([25, 10, 1, 2])
    assert adapter.output_lengths(lengths).tolist() == [13, 5, 1, 1]  # ⌈L/2⌉: 40 ms → 80 ms
    with torch.no_grad():
        out = adapter(torch.randn(4, 25, 64), lengths)
    assert out.shape == (4, 13, 64)
    # the lengths are what the conv produces on each clip alone
    for n in (1, 2, 7, 10, 25):
        assert adapter.conv(torch.randn(1, 64, n)).shape[-1] == int(
            adapter.output_lengths(torch.tensor([n]))[0]
        )
    assert not out[1, 5:].any() and not out[2, 1:].any()  # padded outputs are zero


def test_a_padded_batch_equals_each_clip_alone():
    torch.manual_seed(1)
    adapter = SpeechAdapter(get_speech_adapter_preset("tiny"))
    adapter.init_weights()
    adapter.eval()
    lengths = torch.tensor([31, 12, 5])
    frames = torch.randn(3, 31, 64)
    garbage = frames.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = 100 * torch.randn(31 - n, 64)  # whatever the padding holds
    garbage[2, -1] = float("nan")  # even NaN
    with torch.no_grad():
        batched = adapter(garbage, lengths)
        out_lengths = adapter.output_lengths(lengths).tolist()
        worst = 0.0
        for i, (n, m) in enumerate(zip(lengths.tolist(), out_lengths)):
            alone = adapter(frames[i : i + 1, :n])[0]  # (m, 64), no padding at all
            assert alone.shape[0] == m
            worst = max(worst, (batched[i, :m] - alone).abs().max().item())
    print(f"padded batch vs alone: max |Δ| {worst:.2e}")
    assert worst < 1e-5 and not batched.isnan().any()
    with torch.no_grad():  # a clip with no frames gives no output frame and no NaN in the others
        empty = adapter(frames[:2], torch.tensor([0, 12]))
    assert adapter.output_lengths(torch.tensor([0])).item() == 0 and not empty[0].any()
    assert (empty[1, :6] - batched[1, :6]).abs().max() < 1e-5


def test_splice_puts_each_clips_frames_at_its_placeholder():
    D, AUDIO = 4, 9
    tokens = torch.tensor([[1, 9, 2, 3], [9, 4, 0, 0], [5, 6, 7, 0]])  # row 1 and 2 right-padded
    token_embeds = torch.arange(3 * 4 * D, dtype=torch.float32).reshape(3, 4, D)
    audio = torch.randn(2, 3, D, requires_grad=True)  # clip 0: 3 frames, clip 1: 2 real frames
    out = splice_audio(token_embeds, tokens, audio, torch.tensor([3, 2]), AUDIO, torch.tensor([4, 2, 3]))
    assert out.lengths.tolist() == [6, 3, 3] and out.embeds.shape == (3, 6, D)
    assert out.token_index.tolist() == [[0, -1, -1, -1, 2, 3], [-1, -1, 1, -1, -1, -1], [0, 1, 2, -1, -1, -1]]
    e = token_embeds
    torch.testing.assert_close(
        out.embeds[0], torch.cat([e[0, :1], audio[0].detach(), e[0, 2:]]), atol=0, rtol=0
    )
    torch.testing.assert_close(
        out.embeds[1, :3], torch.cat([audio[1, :2].detach(), e[1, 1:2]]), atol=0, rtol=0
    )
    torch.testing.assert_close(out.embeds[2, :3], e[2, :3], atol=0, rtol=0)  # no audio: the text as it was
    assert not out.embeds[1, 3:].any() and not out.embeds[2, 3:].any()
    out.embeds.sum().backward()  # gradients reach the real audio frames only
    assert audio.grad[0].eq(1).all() and audio.grad[1, :2].eq(1).all() and not audio.grad[1, 2].any()
    with pytest.raises(ValueError, match=r"2 audio placeholder token\(s\) \(id 9\) but 1 clip"):
        splice_audio(token_embeds, tokens, audio[:1], torch.tensor([3]), AUDIO, torch.tensor([4, 2, 3]))


def test_encoder_adapter_and_a_frozen_llm_train_together():
    """Log-mel → Conformer → adapter → spliced into a tiny Llama's input embeddings: a step on the
    encoder and adapter changes them and leaves every LLM weight bit-identical."""
    torch.manual_seed(2)
    llm = build_llama(
        get_preset("tiny", vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    )
    llm.requires_grad_(False)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    encoder = ConformerEncoder(get_speech_preset("tiny"))
    adapter = SpeechAdapter(get_speech_adapter_preset("tiny", llm_dim=64))
    trainable = [*encoder.parameters(), *adapter.parameters()]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    feats, lengths = torch.randn(2, 40, 80), torch.tensor([40, 26])  # 10 ms frames
    tokens = torch.tensor([[3, 63, 5, 6], [63, 7, 8, 9]])  # 63: the audio placeholder
    enc = encoder(feats, lengths)  # (2, 10, 64)
    audio = adapter(enc, encoder.output_lengths(lengths))  # (2, 5, 64): 40 frames → 10 → 5
    spliced = splice_audio(
        llm.embed(tokens), tokens, audio, adapter.output_lengths(encoder.output_lengths(lengths)), 63
    )
    assert spliced.lengths.tolist() == [3 + 5, 3 + 4]
    logits = llm(input_embeds=spliced.embeds)  # (2, 8, 64)
    loss = logits.logsumexp(-1).mean() - logits[..., 1].mean()
    loss.backward()
    assert all(p.grad is None for p in llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    snapshot = [p.detach().clone() for p in trainable]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(snapshot, trainable))
    assert all(torch.equal(before[k], v) for k, v in llm.state_dict().items())
