"""Job configuration: one small dataclass per concern, loaded from TOML, overridable from the CLI.

"args" are architectures (`herd.text.ModelArgs`); a *config* describes the job. Each component
receives only its own section (the optimizer sees `OptimizerConfig`, the loader `DataConfig`, a task
the sections it names in `from_config`), so no component grows a dependency on the whole job. Each
post-training objective has its own section: `[sft]`, `[rm]`, `[dpo]`, `[ppo]`.

Options with a fixed set of values are typed `Literal[...]` and checked when the config loads: a wrong
value is an error naming the key, the value and the choices, before any model is built.

    cfg = load_config("configs/quickstart.toml", ["--train.steps=50", "--optimizer.lr", "1e-3"])
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from herd.adapters.speech import SPEECH_ADAPTER_PRESET_NAMES
from herd.speech.conformer_args import SPEECH_PRESET_NAMES
from herd.text.args import PRESET_NAMES
from herd.vision.vision_args import VISION_PRESET_NAMES

PIPELINE_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


@dataclass
class ModelConfig:
    preset: Literal[*PRESET_NAMES] = "tiny"  # type: ignore[valid-type]
    args: dict[str, Any] = field(default_factory=dict)  # ModelArgs fields replacing the preset's
    init_from: str | None = None  # a checkpoint `load_pretrained` reads (fine-tuning instead of scratch)
    # Train on the corpus's subset of the Llama 3 vocabulary (renumbered densely; see
    # herd.text.vocab_subset). For tiny CPU models only: the 128K-row head would dominate the step.
    vocab_subset: bool = False
    # How a sharded model gets its initial weights: "full" builds and initialises the whole model on
    # every rank (CPU) and shards it — identical to a single-process run, for models that fit in host
    # memory; "sharded" initialises each rank's shards directly (any size); "auto": full below 2B params.
    init: Literal["auto", "full", "sharded"] = "auto"


@dataclass
class ParallelConfig:
    """Degrees of the 4D layout (innermost→outermost TP, CP, PP, DP) and how each is applied."""

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the rest of the world size
    cp: int = 1
    pp: int = 1
    tp: int = 1
    # pipeline: GPipe | 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble (GPU only)
    pp_schedule: Literal[*PIPELINE_SCHEDULES] = "1F1B"  # type: ignore[valid-type]
    pp_microbatches: int | None = None  # None → pp; any number (not tied to the stage count)
    pp_virtual_stages: int = 1  # stages per rank (interleaved schedules: V ≥ 2)
    pp_fewer_layers_on_ends: bool = True  # first/last stage hold one layer fewer (embedding / head)
    cp_impl: Literal["allgather"] = "allgather"  # the paper's all-gather K/V
    sequence_parallel: bool = True  # with TP: norms and residuals sharded along the sequence
    activation_checkpoint: Literal["none", "full", "selective"] = "none"  # of the plan's checkpoint units
    compile: bool = False  # torch.compile each of the plan's compile units (Transformer blocks)
    float8: bool = False  # torchao float8 linear layers (Hopper GPUs)
    fsdp_reshard_after_forward: bool = True
    # FSDP compute dtype: auto (= train.dtype) | bf16 | fp32; master weights stay fp32
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduce-scatter dtype (paper: fp32)

    def degrees(self) -> dict[str, int]:
        """The configured degree of each layout dimension (dp_shard = -1, the rest of the world, counts
        as 1 here: the runtime checks again once it knows the world size)."""
        return {"fsdp": max(self.dp_shard, 1), "hsdp": self.dp_replicate, "tp": self.tp, "cp": self.cp,
                "pp": self.pp}  # fmt: skip


@dataclass
class OptimizerConfig:
    """AdamW with the paper's pretraining hyper-parameters as defaults (§3.4.1)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # learning-rate multipliers by parameter-name substring, e.g. {"gate" = 10.0}: lets the zero-initialised
    # tanh gates of new cross-attention layers open at a useful pace while everything else keeps `lr`
    lr_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Linear warmup, then decay to `min_lr_ratio`·lr at the last step (Llama 3: cosine to 1%)."""

    warmup_steps: int = 2000
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.01


@dataclass
class DataConfig:
    # synthetic | jsonl | parquet | text | tokens (`herd data tokenize` shards)
    source: Literal["synthetic", "jsonl", "parquet", "text", "tokens"] = "synthetic"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    seq_len: int = 128
    batch_size: int = 8  # sequences per micro-batch, across all data-parallel ranks (each takes 1/dp)
    val_fraction: float = 0.02  # of documents held out for the validation loss
    synthetic_docs: int = 6000
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 300
    grad_accum: int = 1
    # Batch-size ramp as [[from_step, grad_accum], ...] (the 405B recipe's 4M → 8M → 16M tokens):
    # from each listed step on, that many micro-batches make one optimizer step.
    grad_accum_ramp: list[list[int]] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast; master weights and optimizer state stay fp32
    run_dir: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8


@dataclass
class CheckpointConfig:
    """Training checkpoints (torch.distributed.checkpoint, resumable on any mesh) and the final export."""

    export_format: Literal["meta", "hf", "none"] = "meta"  # format of the final model export
    interval: int = 0  # save every N steps; 0 = only at the end (if save_final)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted (≤ 0: keep all)
    async_save: bool = False  # write in a background thread; training resumes after the CPU copy
    dir: str | None = None  # default <run_dir>/checkpoints
    resume: str = "auto"  # auto (newest complete checkpoint in dir, if any) | none | a checkpoint path
    save_final: bool = True  # a checkpoint after the last step


@dataclass
class MetricsConfig:
    log_every: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None
    peak_tflops: float | None = None  # per device; enables MFU (H100 dense bf16: 989)


@dataclass
class VisionConfig:
    """Image adapter training (`herd train vision`): a frozen LLM, an image encoder, cross-attention."""

    llm: str | None = None  # checkpoint of the frozen LLM (Meta or Hugging Face layout)
    encoder: Literal[*VISION_PRESET_NAMES] = "tiny"  # type: ignore[valid-type]
    encoder_args: dict[str, Any] = field(default_factory=dict)
    encoder_weights: str | None = None  # open_clip / timm ViT checkpoint for the local transformer
    max_tiles: int = 1  # tiles per image (tile size = the encoder's image_size)
    cross_attention_every: int = 4  # a cross-attention layer after every N self-attention layers
    # qa (loss on the answer) | caption (loss on the caption) | mixed (half of each batch each: the
    # captions' every-object supervision speeds up learning to see, the questions teach answering)
    objective: Literal["qa", "caption", "mixed"] = "qa"
    caption_every: int = 2  # mixed: rows 0, N, 2N, ... of each batch are captions, the rest questions
    train_manifest: str | None = None  # jsonl: {"image": path, "question", "answer" | "caption", ...}
    val_manifest: str | None = None
    shards: str | None = None  # webdataset-style tar shards instead of train_manifest


@dataclass
class VideoConfig:
    """Video adapter training (`herd train video`, paper §7.2.3 and §7.4.3): a perceiver resampler and
    video cross-attention layers added to a trained image model, everything else frozen."""

    init_from: str | None = None  # an image-adapter checkpoint (`herd train vision` export, vision.json)
    # a preset of herd.adapters.perceiver: llama3_8b, llama3_70b, open_flamingo, tiny
    perceiver: str = "tiny"
    perceiver_args: dict[str, Any] = field(default_factory=dict)  # overrides; dim is the LLM's width
    video_every: int = 4  # a video cross-attention layer before every Nth image cross-attention layer
    num_frames: int = 16  # frames sampled uniformly over each video (paper: 16 pretraining, 64 SFT)
    backend: Literal["auto", "decord", "pyav"] = "auto"  # frame reader: decord with a PyAV fallback
    # the paper trains only the video-specific parameters; "adapter" also trains the image adapter
    # (projector, image cross-attention) and "all" the image encoder too; the LLM stays frozen always
    trainable: Literal["video", "adapter", "all"] = "video"
    # video cross-attention blocks start as the image cross-attention block at the same LLM layer (gates
    # still at zero: outputs unchanged) instead of freshly initialised; both read visual tokens
    init_cross_attention: Literal["random", "image"] = "random"
    objective: Literal["qa", "caption", "mixed"] = "qa"
    caption_every: int = 2
    cache_frames: bool = False  # keep each decoded clip in memory (small datasets, e.g. the quickstart)
    # keep each clip's frozen image-encoder output instead (computed once per clip on CPU from the
    # init_from weights; the encoder must stay frozen, so not with trainable = "all"): small datasets read
    # for many epochs, where the encoder's forward is half of a step (the quickstart)
    cache_features: bool = False
    train_manifest: str | None = None  # jsonl: {"video": path, "question", "answer" | "caption", ...}
    val_manifest: str | None = None
    shards: str | None = None  # webdataset-style tar shards (key.mp4 + key.json) instead of train_manifest


@dataclass
class SpeechConfig:
    """Speech-encoder pretraining with BEST-RQ (`herd train speech-encoder`, paper §8.1.1)."""

    encoder: Literal[*SPEECH_PRESET_NAMES] = "tiny"  # type: ignore[valid-type]
    encoder_args: dict[str, Any] = field(default_factory=dict)  # ConformerArgs fields replacing the preset's
    train_manifest: str | None = None  # jsonl: {"audio": path relative to the manifest, ...}
    val_manifest: str | None = None
    shards: str | None = None  # training data as webdataset tar shards (files, a folder or a glob) instead
    # the frozen random-projection quantizer: stacked frames → code_dim, nearest of codebook_size unit-norm
    # codes by cosine, in each of num_codebooks codebooks (paper: 16 × 8192, 16 dims)
    num_codebooks: int = 16
    codebook_size: int = 8192
    code_dim: int = 16
    quantizer_seed: int = 0
    # masking: each 10 ms frame starts a mask_span-frame span with probability mask_prob (paper: 32, 2.5 %);
    # masked frames become N(0, noise_std²) noise
    mask_prob: float = 0.025
    mask_span: int = 32
    noise_std: float = 0.1
    crop_frames: int = 6000  # longer utterances are randomly cropped to this many frames (paper: 6K, 60 s)
    max_seconds: float = 600.0  # files longer than this are skipped (too_long) before decoding
    # --- `herd train speech` (paper §8.1.2, §8.3): the adapter and encoder on a frozen LLM ------------------
    llm: str | None = None  # the frozen LLM's checkpoint
    init_encoder: str | None = (
        None  # a `herd train speech-encoder` export; None: a randomly initialised encoder
    )
    adapter: Literal[*SPEECH_ADAPTER_PRESET_NAMES] = "tiny"  # type: ignore[valid-type]
    adapter_args: dict[str, Any] = field(
        default_factory=dict
    )  # SpeechAdapterArgs fields (llm/encoder dims follow)
    trainable: Literal["all", "adapter"] = (
        "all"  # all: encoder + adapter (the paper); adapter: encoder frozen
    )
    language: str = "English"  # of the task prompts: "Repeat after me in {language}:"
    target_language: str = "English"  # speech translation: records with a `translation` field
    spec_augment: bool = False  # time and frequency masking of the SFT features (SpecAugment, Park et al.)


@dataclass
class PostDataConfig:
    """The data of a post-training objective; the model starts from `model.init_from`."""

    train_data: str | None = None  # jsonl: dialogs (sft), preferences (rm, dpo) or prompts (ppo)
    val_data: str | None = None  # jsonl of the same kind; default: hold out `val_fraction` of train_data
    val_fraction: float = 0.1


@dataclass
class SFTConfig(PostDataConfig):
    """`herd train sft` (Llama 3 §4.1.3): loss on assistant tokens of chat dialogs."""

    pack: bool = True  # several dialogs per sequence, kept apart by the document mask


@dataclass
class RewardModelConfig(PostDataConfig):
    """`herd train rm` (Llama 2 §3.2.2, Llama 3 §4.1.2): Bradley–Terry on preference pairs."""

    # "none" is Llama 3's (no margin), "small"/"large" Llama 2's m(r) by preference strength
    margin: Literal["none", "small", "large"] = "none"


@dataclass
class DPOConfig(PostDataConfig):
    """`herd train dpo` (Llama 3 §4.1.4: beta 0.1, NLL on the chosen reply weighted 0.2, format masked)."""

    beta: float = 0.1
    nll_weight: float = 0.2
    mask_format_tokens: bool = True
    reference: str | None = None  # frozen reference policy; default model.init_from


@dataclass
class PPOConfig(PostDataConfig):
    """`herd train ppo` (Llama 2-Chat RLHF); train_data holds the prompts."""

    reward_model: str | None = None  # a `herd train rm` export
    reference: str | None = None  # frozen reference policy; default model.init_from
    kl_coef: float = 0.01  # KL penalty to the reference policy (Llama 2: 0.01 for 7B/34B, 0.005 for 70B)
    clip: float = 0.2  # PPO's ratio clip
    epochs: int = 1  # optimizer steps on each rollout batch
    value_coef: float = 0.5
    value_clip: float = 0.2  # clip of the value update around the rollout's values
    value_init: Literal["reward_model", "policy"] = "reward_model"  # the value head's start (Llama 2: RM)
    gamma: float = 1.0  # GAE discount
    gae_lambda: float = 0.95
    whiten_reward: bool = False  # Llama 2: whiten the logit of the RM score before the KL penalty
    missing_stop_penalty: float = 0.0  # subtracted from the reward of a reply that never ends
    max_new_tokens: int = 32  # rollout length
    temperature: float = 1.0


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grad_accum_at(train: TrainConfig, step: int) -> int:
    """Micro-batches in optimizer step `step` (1-based), following `grad_accum_ramp` if given."""
    accum = train.grad_accum
    for start, value in sorted(train.grad_accum_ramp):
        if step >= start:
            accum = value
    return accum


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a TOML value against a dataclass field type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(tp)
        if len(inner) != len(value):
            raise ConfigError(f"{where}: expected {len(inner)} values, got {len(value)}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, inner))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys with their full dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if "post" in data and "post" not in names:
        raise ConfigError(
            "the [post] section was split into one section per objective: [sft], [rm], [dpo] and [ppo] "
            "(post.train_data → sft.train_data / rm.train_data / ..., post.ppo_epochs → ppo.epochs, "
            "post.ppo_clip → ppo.clip; see docs/training.md)"
        )
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a table")
            kwargs[key] = from_dict(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """CLI values are TOML literals (`3`, `1e-3`, `true`, `[1, 2]`, `"s"`); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--a.b=1 --c.d 2` → {"a": {"b": 1}, "c": {"d": 2}}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"expected an override like --section.key=value, got {tok!r}")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {tok} has no value")
            key, raw = tok[2:], argv[i + 1]
            i += 2
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_scalar(raw)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = JobConfig
) -> Any:
    """Read a TOML job config (or the defaults when `path` is None) and apply CLI overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from e
