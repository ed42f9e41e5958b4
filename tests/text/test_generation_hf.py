"""Greedy generation equals Hugging Face transformers' `generate` on the same random weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from herd.text import build_llama, get_preset  # noqa: E402
from herd.text.checkpoint_hf import save_hf_checkpoint  # noqa: E402
from herd.text.generation import SamplingParams, generate  # noqa: E402


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_tokens_equal_transformers_generate(tmp_path, tied):
    torch.manual_seed(0)
    args = get_preset(
        "tiny",
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=211,
        multiple_of=16,
        max_seq_len=128,
        tie_embeddings=tied,
    )
    model = build_llama(args)
    # sharpen the random logits so greedy decoding is not decided by float noise between near-ties
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3.0)
    save_hf_checkpoint(tmp_path, args, model.state_dict())
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()

    prompts = [[1, 5, 9, 13], [1, 7, 8, 9, 10, 11, 12], [1, 100]]
    ours = generate(model, prompts, SamplingParams(max_new_tokens=20))
    for prompt, completion in zip(prompts, ours):
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
        assert completion.tokens == ref[0, len(prompt) :].tolist()
