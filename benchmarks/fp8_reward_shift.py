"""The paper's quality check of FP8 inference (§6.2): reward-model scores of responses generated in FP8
vs in bf16 on a fixed prompt set, with and without the 1200 cap on the activation scales.

    python benchmarks/fp8_reward_shift.py --out runs/fp8_shift                      # tiny built models, CPU
    python benchmarks/fp8_reward_shift.py --policy runs/sft/model --reward-model runs/rm/model \
        --prompts prompts.txt --device cuda --backend torchao --out runs/fp8_shift  # real ones on a GPU

The policy generates once in bf16, once with row-wise FP8 FFNs capped at 1200 and once uncapped
(`herd.quantize.apply_fp8`; "emulate" on a CPU, torchao on an H100/H200); the reward model
(`herd train rm` export, `herd.text.reward_model`) scores every prompt + response. Writes
`<out>/fp8_reward_shift.png` (the score histograms) and `<out>/fp8_reward_shift.json` (per variant: mean
score, mean shift vs bf16 and its standard error, share of responses identical to bf16), and prints
the JSON.

Without --policy/--reward-model both are tiny random Llamas built here (seeded), with a few FFN input
channels scaled by --outlier-scale to mimic the massive activations of trained LLMs: in a plain random
model no activation row comes near 1200, and the cap could change nothing. Their scores mean nothing
about quality; the run shows the measurement, the real one needs trained checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from herd.quantize import apply_fp8
from herd.text import build_llama, get_preset
from herd.text.generation import SamplingParams, generate
from herd.text.reward_model import RewardModel


def tiny_models(seed: int, outlier_scale: float, vocab: int) -> tuple[torch.nn.Module, RewardModel]:
    args = get_preset("tiny", dim=128, n_layers=6, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=vocab,
                      max_seq_len=128)  # fmt: skip
    torch.manual_seed(seed)
    policy = build_llama(args).eval()
    with torch.no_grad():
        policy.tok_embeddings.weight.mul_(2.0)  # less flat next-token distributions
        for i in range(1, args.n_layers - 1):  # massive-activation channels entering the FP8 FFNs
            policy.layers[str(i)].ffn_norm.weight[: 2 + i] *= outlier_scale
    torch.manual_seed(seed + 1)
    rm = RewardModel(args)
    rm.init_weights()
    return policy, rm.eval()


@torch.inference_mode()
def score(
    rm: RewardModel, prompts: list[list[int]], responses: list[list[int]], device: torch.device
) -> list[float]:
    out = []
    for prompt, response in zip(prompts, responses):
        seq = torch.tensor([prompt + response], device=device)
        out.append(float(rm(seq, torch.tensor([seq.shape[1] - 1], device=device))[0]))
    return out


def count_capped_rows(model: torch.nn.Module, cap: float) -> tuple[dict[str, int], list]:
    """Forward hooks on the emulated FP8 layers: activation rows seen, and rows whose amax exceeds `cap`."""
    from herd.text.fp8 import Fp8RowwiseLinear

    counts = {"rows": 0, "capped": 0}

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        amax = inputs[0].detach().abs().amax(-1)
        counts["rows"] += amax.numel()
        counts["capped"] += int((amax > cap).sum())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Fp8RowwiseLinear)]
    return counts, handles


def summary(scores: list[float], base: list[float], same: list[bool]) -> dict[str, float]:
    s, b = torch.tensor(scores), torch.tensor(base)
    d = s - b
    return {"mean_score": round(float(s.mean()), 4), "std_score": round(float(s.std()), 4),
            "mean_shift": round(float(d.mean()), 4), "shift_stderr": round(float(d.std() / len(d) ** 0.5), 4),
            "mean_abs_shift": round(float(d.abs().mean()), 4),
            "identical_responses": round(sum(same) / len(same), 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=None, help="text checkpoint (default: a tiny random one)")
    p.add_argument("--reward-model", default=None, help="`herd train rm` export (default: tiny random)")
    p.add_argument("--prompts", default=None, help="one prompt per line (default: seeded random token ids)")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--backend", default="auto", choices=["auto", "emulate", "torchao"])
    p.add_argument("--outlier-scale", type=float, default=400.0, help="built models only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fp8_reward_shift")
    a = p.parse_args()
    device, dtype = torch.device(a.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    tokenizer = None
    if a.policy:
        from herd.text.loading import load_pretrained
        from herd.text.reward_model import load_reward_model

        policy, tokenizer = load_pretrained(a.policy, device=device, dtype=dtype)
        rm, _ = load_reward_model(a.reward_model, device=device)
    else:
        policy, rm = tiny_models(a.seed, a.outlier_scale, vocab=512)
        policy = policy.to(device, dtype)
        rm = rm.to(device)
    if a.prompts:
        if tokenizer is None:
            raise SystemExit("--prompts needs --policy (its tokenizer encodes them)")
        lines = [x for x in Path(a.prompts).read_text().splitlines() if x.strip()]
        prompts = [tokenizer.encode(x, bos=True, eos=False) for x in lines]
    else:
        g = torch.Generator().manual_seed(a.seed)
        prompts = [torch.randint(1, policy.args.vocab_size, (int(n),), generator=g).tolist()
                   for n in torch.randint(4, 16, (a.n_prompts,), generator=g)]  # fmt: skip
    stops = tuple(tokenizer.stop_ids) if tokenizer is not None else ()
    params = SamplingParams(a.max_new_tokens, a.temperature, 1.0, seed=a.seed)
    variants = {"bf16": None, "fp8_cap1200": 1200.0, "fp8_uncapped": None}
    responses, scores, layers, counts = {}, {}, 0, {"rows": 0, "capped": 0}
    for name, cap in variants.items():
        model = policy if name == "bf16" else copy.deepcopy(policy)
        handles = []
        if name != "bf16":
            layers = len(apply_fp8(model, backend=a.backend, activation_cap=cap))
        if name == "fp8_cap1200":  # how often the cap binds (emulated layers only)
            counts, handles = count_capped_rows(model, 1200.0)
        responses[name] = [c.tokens for c in generate(model, prompts, params, stops)]
        for h in handles:
            h.remove()
        scores[name] = score(rm, prompts, responses[name], device)
    report = {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "dtype": a.dtype, "fp8_layers": layers,
              "policy": a.policy or f"tiny random (outlier scale {a.outlier_scale})",
              "reward_model": a.reward_model or "tiny random",
              "activation_rows_over_cap": f"{counts['capped']} of {counts['rows']}"}  # fmt: skip
    for name in variants:
        same = [r == b for r, b in zip(responses[name], responses["bf16"])]
        report[name] = summary(scores[name], scores["bf16"], same)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_reward_shift.json").write_text(json.dumps(report, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    lo = min(min(v) for v in scores.values())
    hi = max(max(v) for v in scores.values())
    bins = torch.linspace(lo, hi + 1e-6, 25).tolist()
    for ax, name in zip(axes, ("fp8_cap1200", "fp8_uncapped")):
        ax.hist(scores["bf16"], bins=bins, alpha=0.55, label="bf16")
        ax.hist(scores[name], bins=bins, alpha=0.55, label=name)
        ax.set_title(f"{name}: shift {report[name]['mean_shift']:+.3f} ± {report[name]['shift_stderr']:.3f}")
        ax.set_xlabel("reward-model score")
        ax.legend()
    axes[0].set_ylabel("responses")
    fig.tight_layout()
    fig.savefig(out / "fp8_reward_shift.png", dpi=120)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
