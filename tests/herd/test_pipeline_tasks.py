"""Every task trains under pipeline parallelism as one process does: the runtime hands the last stage's
output to the task's own loss (herd.task), so vision (the paper's stage layout: a cross-attention layer
with the self-attention layers before it, the image encoder replicated on every stage), SFT, the reward
model and DPO give one process's losses and gradient norms (fp32, gloo, 3 steps).

A gradient norm held to one process's also catches a replicated module whose gradient is not summed over
the stages (or summed twice): Adam would hide a constant factor in the losses."""

import json

import pytest
import torch
from tiny_workspaces import write_preference_workspace, write_vision_workspace

from herd.config import load_config
from herd.parallel.launch import spawn_ranks
from herd.plans.multimodal import pipeline_units
from herd.task import build_task
from herd.trainer import train

TOLERANCE = 1e-4
COMMON = [
    "--train.steps=3", "--metrics.log_every=1", "--train.eval_every=0", "--metrics.tensorboard=false",
    "--checkpoint.save_final=false", "--checkpoint.resume=none", "--train.device=cpu", "--optimizer.lr=3e-3",
    "--schedule.warmup_steps=2",
]  # fmt: skip
PP2 = ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"]


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_tasks")
    write_vision_workspace(root / "vision", 32, 8)
    write_preference_workspace(root / "prefs", 100, 20)
    write_sft_dialogs(root)
    return root


def overrides(kind: str, root, run_dir) -> list[str]:
    if kind == "vision":
        w = root / "vision"
        data = [f"--vision.llm={w / 'llm'}", f"--vision.train_manifest={w / 'shapes' / 'train.jsonl'}",
                "--vision.cross_attention_every=1", "--data.batch_size=4"]  # fmt: skip
    elif kind in ("rm", "dpo"):
        w = root / "prefs"
        data = [f"--model.init_from={w / 'llm'}", f"--{kind}.train_data={w / 'prefs' / 'train.jsonl'}",
                f"--{kind}.val_data={w / 'prefs' / 'val.jsonl'}", "--data.batch_size=8", "--data.seq_len=96"]  # fmt: skip
    else:  # sft on dialogs made of the preference records' prompts and chosen replies
        w = root / "prefs"
        data = [f"--model.init_from={w / 'llm'}", f"--sft.train_data={root / 'sft_dialogs.jsonl'}",
                "--sft.val_fraction=0", "--data.batch_size=4", "--data.seq_len=96"]  # fmt: skip
    return [*data, f"--train.run_dir={run_dir}", *COMMON]


def write_sft_dialogs(root) -> None:
    """SFT dialogs: the preference records' prompts answered with their chosen reply."""
    out = root / "sft_dialogs.jsonl"
    rows = []
    for line in (root / "prefs" / "prefs" / "train.jsonl").read_text().splitlines()[:48]:
        rec = json.loads(line)
        prompt = rec.get("prompt") or rec["messages"][-1]["content"]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": rec["chosen"]},
                ]
            }
        )
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(kind: str, root, run_dir, extra: list[str]) -> list[tuple[float, float]]:
    if kind == "vision_sharded_init":  # each stage fills its own share; the encoder's copies must agree
        kind, extra = "vision", [*extra, "--model.init=sharded"]
    cfg = load_config(None, [*overrides(kind, root, run_dir), *extra])
    result = train(cfg, build_task(kind, cfg), show_progress=False)
    return [(h["loss"], h["grad_norm"]) for h in result.history]


def run_kinds(root, run_dir, kinds: list[str], extra: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Several tasks one after another in the same ranks (one process start-up for all)."""
    return {kind: run(kind, root, run_dir / kind, extra) for kind in kinds}


KINDS = ["vision", "sft", "rm", "dpo"]


@pytest.fixture(scope="module")
def single(workspaces, tmp_path_factory):
    return run_kinds(workspaces, tmp_path_factory.mktemp("single"), KINDS, [])


@pytest.fixture(scope="module")
def pp2(workspaces, single, tmp_path_factory):
    kinds = [*KINDS, "vision_sharded_init"]
    return spawn_ranks(run_kinds, 2, workspaces, tmp_path_factory.mktemp("pp2"), kinds, PP2, timeout_s=600)


def assert_matches(reference: list[tuple[float, float]], got: list[tuple[float, float]], what: str) -> None:
    assert len(got) == len(reference) == 3, what
    for (loss, norm), (ref_loss, ref_norm) in zip(got, reference):
        assert abs(loss - ref_loss) < TOLERANCE, (what, got, reference)
        assert abs(norm / ref_norm - 1) < TOLERANCE, (what, got, reference)


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", [*KINDS, "vision_sharded_init"])
def test_pipeline_parallel_task_matches_one_process(kind, single, pp2):
    reference = single[kind.removesuffix("_sharded_init")]
    assert reference[-1][0] != reference[0][0]  # the steps do train
    for rank, result in enumerate(pp2):  # every rank logs the same global numbers
        assert_matches(reference, result[kind], f"{kind} pp=2 rank {rank}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pp2_fsdp2_matches_one_process(workspaces, single, tmp_path):
    """The paper's scaling layout for the image adapter: pipeline stages, each data-parallel (FSDP); and the
    reward model, whose batches also differ in length from one data rank to the other."""
    layout = ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.pp_microbatches=2"]
    results = spawn_ranks(run_kinds, 4, workspaces, tmp_path, ["vision", "rm"], layout, timeout_s=600)
    for kind in ("vision", "rm"):
        for rank, result in enumerate(results):
            assert_matches(single[kind], result[kind], f"{kind} pp=2 × fsdp=2 rank {rank}")


def test_vision_stages_keep_a_cross_attention_layer_with_the_layers_before_it(workspaces):
    cfg = load_config(None, overrides("vision", workspaces, workspaces / "x"))
    task = build_task("vision", cfg)
    model = task.build_model()  # meta device
    units = pipeline_units(model)
    # cross-attention before every layer of the 2-layer LLM: [x0], [layer 0, x1], [layer 1]
    assert units == [[("xattn", "0")], [("layer", "0"), ("xattn", "1")], [("layer", "1")]]
    stage = task.plan.pipeline.build_stage(model, 1, 2, [1, 2])
    assert sorted(stage.cross_attention) == ["1"] and sorted(stage.llm.layers) == ["0", "1"]
    assert stage.vision is not None and stage.image_token_embeddings is None  # encoder replicated
    assert task.plan.pipeline.replicated(stage) == ["vision", "projector"]
    assert isinstance(stage.llm.output, torch.nn.Linear)
