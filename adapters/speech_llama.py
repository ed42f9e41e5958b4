"""The composed speech model (paper §8): a frozen `herd.text.Llama`, the Conformer speech encoder and the
speech adapter, whose outputs stand in the LLM's input sequence where the audio placeholders are.

    log-mel (N, T, 80), lengths (N,) ─▶ ConformerEncoder ─▶ (N, T', E)       40 ms frames
                                     ─▶ SpeechAdapter    ─▶ (N, T'', D)      80 ms frames, LLM width
    tokens (B, S) with T''_i `<|audio|>` placeholders per clip i
        ─embed─▶ (B, S, D), the placeholders' rows replaced by the clips' frames ─▶ LLM ─▶ logits (B, S, V)

Placeholders: a clip of `audio_tokens(n)` adapter frames is written into the prompt as that many
consecutive `<|audio|>` tokens (id `vocab_size`, outside the LLM's vocabulary: its row is always
replaced, so it needs no embedding), and the k-th run of placeholders in row-major order takes clip k.
The number is known from the clip's length alone (`audio_tokens`), so a batch's sequence length, labels
and positions are fixed when it is collated, the KV cache needs nothing new, and tensor parallelism sees
an ordinary sequence — the layout Hugging Face's audio LMs use (one `<|AUDIO|>` per frame after their
processor), rather than one placeholder that the model widens (`splice_audio`, kept as a utility).

The LLM never trains (`freeze_llm`); encoder and adapter train together (paper §8.3.1), or the adapter
alone (`freeze_encoder`). Decoding: `bind_audio` (or `generate_with_audio`) encodes the clips once and
holds the rows to put in the prompt; `herd.text.generate` then works unchanged.

Shape legend: B rows, N clips, S tokens, T 10 ms feature frames, T' encoder frames, T'' adapter frames,
D the LLM's width, V its vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from herd.adapters.speech import SpeechAdapter, SpeechAdapterArgs
from herd.speech.conformer import ConformerEncoder
from herd.speech.features import num_frames
from herd.text.generation import Completion, SamplingParams, generate
from herd.text.kv_cache import KVCache
from herd.text.model import Llama


def place_audio(
    tokens: torch.Tensor,  # (B, S) ids with `<|audio|>` runs in place
    audio_embeds: torch.Tensor,  # (N, T'', D) the adapter's outputs, zero past each clip's length
    audio_lengths: torch.Tensor,  # (N,) real frames per clip
    audio_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that replace the placeholders: (values (B, S, D), mask (B, S) bool). Clip k's real frames
    go, in order, into the k-th run of placeholders (row-major); each run must be exactly as long as its
    clip. Differentiable in `audio_embeds`."""
    mask = tokens == audio_token_id  # (B, S)
    lengths = audio_lengths.tolist()
    runs = placeholder_runs(mask)
    if [n for _, n in runs] != [int(n) for n in lengths]:
        raise ValueError(
            f"audio placeholder runs of lengths {[n for _, n in runs]} (id {audio_token_id}) do not match "
            f"the clips' {[int(n) for n in lengths]} frames: write `audio_tokens(frames)` placeholders per clip"
        )
    if audio_embeds.shape[0] != len(lengths):
        raise ValueError(f"{audio_embeds.shape[0]} clips of embeddings but {len(lengths)} lengths")
    real = torch.arange(audio_embeds.shape[1], device=audio_embeds.device)[None] < audio_lengths[:, None]
    frames = audio_embeds[real]  # (Σ T''_i, D) clip after clip, in order
    values = torch.zeros(
        *tokens.shape, audio_embeds.shape[-1], dtype=audio_embeds.dtype, device=tokens.device
    )
    return values.masked_scatter(mask[..., None], frames), mask


def placeholder_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(row, length) of each maximal run of True in mask (B, S), in row-major order."""
    runs = []
    for b, row in enumerate(mask.tolist()):
        n = 0
        for value in [*row, False]:
            if value:
                n += 1
            elif n:
                runs.append((b, n))
                n = 0
    return runs


class SpeechLlama(nn.Module):
    """Frozen Llama + speech encoder + speech adapter; `forward(tokens, audio_features, audio_lengths)`
    returns logits (B, S, V) (module docstring)."""

    def __init__(
        self,
        llm: Llama,
        encoder: ConformerEncoder,
        adapter: SpeechAdapterArgs | SpeechAdapter,
        freeze_llm: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(adapter, SpeechAdapterArgs):
            adapter = SpeechAdapter(adapter)
        if adapter.args.encoder_dim != encoder.args.dim:
            raise ValueError(
                f"the adapter reads {adapter.args.encoder_dim}-dim frames, the encoder writes {encoder.args.dim}"
            )
        if adapter.args.llm_dim != llm.args.dim:
            raise ValueError(
                f"the adapter writes {adapter.args.llm_dim}-dim rows, the LLM's are {llm.args.dim}"
            )
        self.llm, self.encoder, self.adapter = llm, encoder, adapter
        self.args = llm.args  # generation reads max_seq_len from here
        # `<|audio|>`: the first id past the LLM's vocabulary; never looked up, always replaced
        self.audio_token_id = llm.args.vocab_size
        self._bound: tuple[torch.Tensor, torch.Tensor] | None = None
        if freeze_llm:
            self.freeze_llm()

    # --- training helpers ---------------------------------------------------------------------------
    def freeze_llm(self) -> None:
        """The LLM's parameters never change (paper §8): no gradients, so no optimizer state either."""
        self.llm.requires_grad_(False)

    def freeze_encoder(self) -> None:
        """Train the adapter alone (the encoder stays as pretrained)."""
        self.encoder.requires_grad_(False)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen LLM: the encoder and the adapter."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def init_weights(self) -> None:
        """The encoder's and the adapter's own initialisation (the LLM comes from its checkpoint)."""
        self.encoder.init_weights()
        self.adapter.init_weights()

    # --- pieces -------------------------------------------------------------------------------------
    def audio_tokens(self, feature_frames: int) -> int:
        """Placeholders (adapter frames) of a clip of `feature_frames` 10 ms log-mel frames."""
        return int(self.audio_token_lengths(torch.tensor([feature_frames]))[0])

    def audio_token_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """`audio_tokens` of each clip, (N,) → (N,)."""
        return self.adapter.output_lengths(self.encoder.output_lengths(feature_lengths))

    def audio_tokens_for_samples(self, num_samples: int) -> int:
        """Placeholders of a clip of `num_samples` 16 kHz samples."""
        return int(self.audio_tokens(int(num_frames(num_samples))))

    def encode_audio(
        self,
        audio_features: torch.Tensor,  # (N, T, n_mels) normalised log-mel
        audio_lengths: torch.Tensor | None = None,  # (N,) real 10 ms frames
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio-only path: (N, T'', D) LLM-width rows (zero past each clip's end) and their lengths (N,)."""
        if audio_lengths is None:
            audio_lengths = torch.full(
                (audio_features.shape[0],),
                audio_features.shape[1],
                dtype=torch.long,
                device=audio_features.device,
            )
        frames = self.encoder(audio_features, audio_lengths)  # (N, T', E)
        enc_lengths = self.encoder.output_lengths(audio_lengths)
        embeds = self.adapter(frames, enc_lengths)  # (N, T'', D)
        return embeds, self.adapter.output_lengths(enc_lengths)

    def embed(
        self,
        tokens: torch.Tensor,  # (B, S)
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        start_pos: int | torch.Tensor = 0,  # a 0-dim long tensor in a static-cache decode step
    ) -> torch.Tensor:
        """(B, S) → (B, S, D): the LLM's embeddings with the audio frames where the placeholders are."""
        is_audio = tokens == self.audio_token_id
        h = self.llm.embed(tokens.masked_fill(is_audio, 0))  # (B, S, D)
        if audio_features is not None:
            if start_pos:
                raise ValueError("audio inputs go with the whole prompt (start_pos 0)")
            embeds, lengths = self.encode_audio(audio_features, audio_lengths)
            values, mask = place_audio(tokens, embeds, lengths, self.audio_token_id)
        elif self._bound is not None:
            rows, bound_mask = self._bound  # the prompts' rows (B, S_prompt, D), bound by `bind_audio`
            prompt_len = rows.shape[1]
            # positions as a tensor (no Python int from start_pos): one compiled decode step serves all
            pos = start_pos + torch.arange(tokens.shape[1], device=tokens.device)  # (S,)
            index = pos.clamp(max=prompt_len - 1)
            values = rows[:, index]  # (B, S, D)
            mask = bound_mask[:, index] & (pos < prompt_len)[None, :]  # past the longest prompt: nothing
            if values.shape[0] != tokens.shape[0]:
                raise ValueError(f"bound audio has {values.shape[0]} rows, the batch {tokens.shape[0]}")
        else:
            if bool(is_audio.any()):
                raise ValueError("the tokens hold <|audio|> placeholders but no audio was given")
            return h
        return torch.where(mask[..., None], values.to(h.dtype), h)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, S) int
        audio_features: torch.Tensor | None = None,  # (N, T, n_mels) normalised log-mel, N clips
        audio_lengths: torch.Tensor | None = None,  # (N,) real 10 ms frames per clip
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        document_ids: torch.Tensor | None = None,  # (B, S) packed-sequence document mask
    ) -> torch.Tensor:
        h = self.embed(tokens, audio_features, audio_lengths, start_pos)  # (B, S, D)
        h = self.llm.forward_hidden(
            input_embeds=h, document_ids=document_ids, kv_cache=kv_cache, start_pos=start_pos
        )
        return self.llm.head(h)  # (B, S, V)

    # --- decoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def bind_audio(
        self,
        prompts: Sequence[Sequence[int]],  # each row's prompt ids, placeholders in place
        audio_features: torch.Tensor,  # (N, T, n_mels)
        audio_lengths: torch.Tensor | None = None,  # (N,)
    ) -> None:
        """Encode the clips once and keep the rows that the prompts' placeholders take, for the next
        decode (`herd.text.generate` feeds prompt positions in any chunks; each finds its rows here)."""
        device = next(self.parameters()).device
        S = max(map(len, prompts))
        tokens = torch.full((len(prompts), S), -1, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        lengths = None if audio_lengths is None else audio_lengths.to(device)
        embeds, out_lengths = self.encode_audio(audio_features.to(device), lengths)
        self._bound = place_audio(tokens, embeds, out_lengths, self.audio_token_id)

    def clear_audio(self) -> None:
        self._bound = None

    def new_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,  # a `StaticKVCache` for compiled decoding (`herd.fast_decode`)
    ) -> KVCache:
        return self.llm.new_kv_cache(batch_size, max_seq_len, dtype, static=static)


def generate_with_audio(
    model: SpeechLlama,
    prompts: Sequence[Sequence[int]],
    audio_features: torch.Tensor,  # (N, T, n_mels), clip k for the k-th placeholder run
    audio_lengths: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] | frozenset[int] = (),
    pad_id: int = 0,
    **kwargs: Any,
) -> list[Completion]:
    """`herd.text.generate` with audio in the prompts."""
    model.bind_audio(prompts, audio_features, audio_lengths)
    try:
        return generate(model, prompts, params, stop_ids, pad_id, **kwargs)
    finally:
        model.clear_audio()


__all__ = ["SpeechLlama", "generate_with_audio", "place_audio", "placeholder_runs"]
