"""Llama model: presets, meta-device build, document mask, KV cache, GQA."""

import math

import pytest
import torch

from herd.text import KVCache, build_llama, get_preset
from herd.text.generation import SamplingParams, generate
from herd.text.model import Llama, build_attention_mask
from herd.text.rope import rope_frequencies

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=128)


def small_model(**kw) -> Llama:
    torch.manual_seed(0)
    return build_llama(get_preset("tiny", **{**SMALL, **kw}))


# published parameter counts (billions) and FFN widths of Meta's checkpoints
@pytest.mark.parametrize(
    "name, ffn, billions",
    [
        ("llama1_7b", 11008, 6.74),
        ("llama1_33b", 17920, 32.53),
        ("llama1_65b", 22016, 65.29),
        ("llama2_13b", 13824, 13.02),
        ("llama2_70b", 28672, 68.98),
        ("llama3_8b", 14336, 8.03),
        ("llama3_70b", 28672, 70.55),
        ("llama3_1_405b", 53248, 405.85),
        ("llama3_2_1b", 8192, 1.24),
        ("llama3_2_3b", 8192, 3.21),
    ],
)
def test_presets_match_published_sizes(name, ffn, billions):
    args = get_preset(name)
    assert args.ffn_hidden_dim == ffn
    assert abs(args.num_params() / 1e9 - billions) < 0.01, args.num_params()


def test_meta_build_counts_parameters_exactly():
    with torch.device("meta"):
        model = Llama(get_preset("llama3_8b"))
    assert sum(p.numel() for p in model.parameters()) == get_preset("llama3_8b").num_params()


def test_tied_model_has_no_output_matrix():
    model = small_model(tie_embeddings=True)
    assert model.output is None
    x = torch.randint(0, 97, (1, 5))
    expected = model.norm(model.forward_hidden(x)) @ model.tok_embeddings.weight.T
    torch.testing.assert_close(model(x), expected)


def test_init_weights_is_deterministic_and_sane():
    a, b = small_model(), small_model()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    # initial loss of a random model is ln(V) + σ²/2 with logit std σ ≈ 1 (output init std dim^-0.5)
    logits = a(torch.randint(0, 97, (2, 16)))
    assert 0.7 < logits.std().item() < 1.3
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 97, (32,)))
    assert abs(loss.item() - math.log(97) - 0.5) < 0.3


def test_rope_scaling_matches_llama31_reference_values():
    # Llama 3.1 8B: frequencies with wavelength < 8192/4 are kept, > 8192 divided by 8, smooth between.
    args = get_preset("llama3_1_8b")
    scaled = rope_frequencies(args)
    plain = rope_frequencies(get_preset("llama3_8b"))
    wavelen = 2 * math.pi / plain
    assert torch.equal(scaled[wavelen < 2048], plain[wavelen < 2048])
    torch.testing.assert_close(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_packed_sequence_equals_documents_run_alone():
    model = small_model()
    torch.manual_seed(1)
    lengths = [7, 12, 5, 9]
    docs = [torch.randint(0, 97, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]  # (1, 33)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed_logits = model(packed, document_ids=doc_ids)[0]
    alone = torch.cat([model(d[None])[0] for d in docs])
    diff = (packed_logits - alone).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"
    # without the mask, later documents see earlier ones: the logits must differ
    unmasked = model(packed)[0]
    assert (unmasked[lengths[0] :] - alone[lengths[0] :]).abs().max().item() > 1e-3


def test_document_mask_shape_and_content():
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    mask = build_attention_mask(5, 0, ids, torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_decoding_equals_full_recomputation(n_kv_heads):
    model = small_model(n_kv_heads=n_kv_heads)
    torch.manual_seed(2)
    seq = torch.randint(0, 97, (3, 20))
    full = model(seq)
    cache = model.new_kv_cache(3, 32)
    chunks = [model(seq[:, :8], kv_cache=cache, start_pos=0)]
    chunks.append(model(seq[:, 8:13], kv_cache=cache, start_pos=8))  # multi-token chunk with offset
    for t in range(13, 20):
        chunks.append(model(seq[:, t : t + 1], kv_cache=cache, start_pos=t))
    incremental = torch.cat(chunks, dim=1)
    diff = (incremental - full).abs().max().item()
    assert diff < 1e-5, f"max abs diff {diff}"


def test_kv_cache_expand_rows_shares_the_prefill():
    model = small_model()
    prompt = torch.randint(0, 97, (2, 6))
    cache = model.new_kv_cache(2, 16)
    model(prompt, kv_cache=cache, start_pos=0)
    shared = cache.expand_rows(3, 6)
    nxt = torch.randint(0, 97, (6, 1))
    out = model(nxt, kv_cache=shared, start_pos=6)[:, -1]
    full = model(torch.cat([prompt.repeat_interleave(3, 0), nxt], dim=1))[:, -1]
    assert (out - full).abs().max().item() < 1e-5


def test_cache_overflow_and_bad_inputs_raise_clearly():
    cache = KVCache(1, 1, 4, 1, 8)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, 3, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    model = small_model()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_input_embeds_path_equals_token_path():
    model = small_model()
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(input_embeds=model.embed(x)), model(x))


def test_generate_batched_equals_one_by_one_and_full_recompute():
    model = small_model()
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 7, 5)]
    params = SamplingParams(max_new_tokens=10)
    batched = generate(model, prompts, params)
    for p, c in zip(prompts, batched):
        alone = generate(model, [p], params)[0]
        assert c.tokens == alone.tokens
        # greedy by full recomputation without a cache
        seq = list(p)
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert c.tokens == seq[len(p) :]


def test_generate_stops_on_stop_token_and_sampling_is_seeded():
    model = small_model()
    prompt = [[5, 6, 7]]
    greedy = generate(model, prompt, SamplingParams(max_new_tokens=6))[0].tokens
    stop = greedy[2]
    cut = generate(model, prompt, SamplingParams(max_new_tokens=6), stop_ids=[stop])[0]
    assert cut.stop_token == stop and cut.tokens == greedy[: greedy.index(stop)]
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, b = generate(model, prompt, p)[0].tokens, generate(model, prompt, p)[0].tokens
    assert a == b
    c = generate(model, prompt, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8))[
        0
    ].tokens
    assert a != c


def test_top_p_keeps_only_the_nucleus():
    from herd.text.generation import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 ≥ 0.7: tokens 2 and 3 are never drawn


def test_explicit_positions_and_gathered_keys_reproduce_the_full_sequence():
    """The context-parallel seam: queries of a permuted chunk order against keys gathered in that
    order give the full sequence's logits (this is what herd's CP relies on)."""
    model = small_model()
    torch.manual_seed(4)
    T, c = 16, 4  # 2 "ranks" × 2 chunks of 4
    tokens = torch.randint(0, 97, (2, T))
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 11 + [1] * 5])
    full = model(tokens, document_ids=docs)
    order = torch.cat(
        [torch.arange(0, c), torch.arange(3 * c, 4 * c), torch.arange(c, 2 * c), torch.arange(2 * c, 3 * c)]
    )
    # single-process stand-in for the all-gather: the whole permuted sequence is "local"
    model.kv_gather = lambda x: x
    try:
        out = model(tokens[:, order], document_ids=docs[:, order], positions=order)
    finally:
        model.kv_gather = None
    assert (out - full[:, order]).abs().max().item() < 1e-5
