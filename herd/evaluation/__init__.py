"""Evaluation of herd checkpoints (docs/evaluation.md): lm-evaluation-harness tasks through the `herd` model
class (`lm_harness`), the Llama 3 paper's robustness and contamination analyses (`robustness`,
`contamination`), VQA / video QA / ASR scoring (`answers`, `multimodal`) and reward-score distributions
(`reward_scores`). Submodules import their heavy dependencies (lm_eval, matplotlib, jiwer) themselves."""
