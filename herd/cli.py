"""The `herd` console script (also `python -m herd`): one entry point per job.

Each subcommand is a thin layer over a Python function of the same name, so scripts can call
`herd.quickstart.run_quickstart(...)`, `herd.text.generation.generate_text(...)` etc. directly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from herd import __version__


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Meta or Hugging Face layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: as stored")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)


def _sampling(args: argparse.Namespace):
    from herd.text.generation import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from herd.quickstart import run_quickstart

    vision = [f"--train.steps={args.vision_steps}"] if args.vision_steps else []
    run_quickstart(args.out, args.config, args.overrides, vision)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from herd.config import load_config
    from herd.parallel.launch import init_distributed
    from herd.task import build_task
    from herd.trainer import train

    cfg = load_config(args.config, args.overrides)
    rank, _, _ = init_distributed()
    task = build_task(args.modality, cfg)
    result = train(cfg, task)
    state = result.runtime.full_state_dict()  # collective: every rank takes part, rank 0 gets it
    if rank == 0:
        out = task.export(state, f"{cfg.train.run_dir}/model", cfg.checkpoint.export_format)
        print(f"final loss {result.final_loss:.4f}; model written to {out}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from PIL import Image

    from herd.ask import VisionQA

    qa = VisionQA.load(args.model, device=args.device)
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as e:
            print(f"herd ask: cannot read image {path}: {e}", file=sys.stderr)
            return 2
    questions = args.question if len(args.question) == len(images) else args.question * len(images)
    for path, question, answer in zip(args.image, questions, qa.ask(images, questions, args.max_new_tokens)):
        print(f"{path}\t{question}\t{answer}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from herd.text.generation import generate_text
    from herd.text.loading import load_pretrained

    model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    prompts = args.prompt or [sys.stdin.read()]
    for prompt, completion in zip(prompts, generate_text(model, tokenizer, prompts, _sampling(args))):
        print(prompt + completion)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from herd.text.chat import ChatSession
    from herd.text.loading import load_pretrained

    model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    session = ChatSession(model, tokenizer, system=args.system, params=_sampling(args))
    if args.message:  # scripted: each --message is one user turn
        for message in args.message:
            print(f"assistant: {session.reply(message).content}")
        return 0
    print("herd chat: type a message, an empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input("user: ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        print(f"assistant: {session.reply(line).content}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd", description="The Llama 3 herd of models, rebuilt for researchers."
    )
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="train a tiny model on CPU end to end and show what it learned")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--config", default=None, help="default: configs/quickstart.toml")
    p.add_argument("--vision-steps", type=int, default=None, help="default: configs/quickstart_vision.toml")
    p.set_defaults(func=cmd_quickstart, takes_overrides=True)

    p = sub.add_parser(
        "train", help="train with the one training loop; extra --section.key=value override the config"
    )
    p.add_argument("modality", choices=["text", "vision", "sft", "rm", "dpo", "ppo"])
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("ask", help="answer questions about images with a trained vision checkpoint")
    p.add_argument("--model", required=True, help="vision checkpoint folder (herd train vision / quickstart)")
    p.add_argument("--image", action="append", required=True, help="repeatable; images are batched")
    p.add_argument("--question", action="append", required=True, help="one per image, or one for all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("generate", help="plain completion from a checkpoint")
    _add_model_options(p)
    p.add_argument("--prompt", action="append", help="repeatable; prompts are batched (default: stdin)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with an instruction-tuned checkpoint (Llama 3.1 chat format)")
    _add_model_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--message", action="append", help="scripted user turns instead of an interactive prompt")
    p.set_defaults(func=cmd_chat)

    from herd.convert_cli import add_parser as add_convert

    add_convert(sub)
    from herd.average import add_parser as add_average
    from herd.sample import add_parser as add_sample

    add_sample(sub)
    add_average(sub)
    from herd.data.curation.ghost_attention import add_parser as add_gatt

    add_gatt(sub)
    from herd.tasks.dpo import add_parser as add_dpo_reference

    add_dpo_reference(sub)
    from herd.data.tokenize_cli import add_parser as add_tokenize
    from herd.planner_cli import add_parser as add_plan

    add_plan(sub)

    add_tokenize(sub)
    try:
        from herd.data.cli import add_parsers as add_data_parsers
    except ImportError:  # data tools are optional extras
        add_data_parsers = None
    if add_data_parsers is not None:
        add_data_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    code = args.func(args)
    if isinstance(code, int) and code:
        sys.exit(code)
    return 0
