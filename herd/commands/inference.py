"""`herd generate`, `herd chat`, `herd ask`: inference with a checkpoint.

    herd generate --model runs/x/model --prompt "Count: one two" --max-new-tokens 8
    herd chat --model runs/sft/model --system "be brief" --message "hi"
    herd ask --model runs/quickstart/vision_model --image shapes.png --question "How many shapes?"

Python: `herd.text.generation.generate_text`, `herd.text.chat.ChatSession`, `herd.ask.VisionQA`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from herd.commands.common import UsageError
from herd.commands.registry import add_command


def _sampling(args: argparse.Namespace) -> Any:
    from herd.text.generation import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """`herd.text.generation.generate_text` on a checkpoint `load_pretrained` reads; one line per prompt."""
    from herd.text.generation import generate_text
    from herd.text.loading import load_pretrained

    model, tokenizer = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    prompts = args.prompt or [sys.stdin.read()]
    for prompt, completion in zip(prompts, generate_text(model, tokenizer, prompts, _sampling(args))):
        print(prompt + completion)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A `herd.text.chat.ChatSession`: scripted turns (--message) or an interactive prompt."""
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


def cmd_ask(args: argparse.Namespace) -> int:
    """`herd.ask.VisionQA.ask` / `VideoQA.ask`: one "file<TAB>question<TAB>answer" line per image or video."""
    from herd.ask import VisionQA, read_image

    if bool(args.image) == bool(args.video):
        raise UsageError("give --image or --video (repeatable), not both and not neither")
    if args.video:
        return _ask_videos(args)
    if len(args.question) not in (1, len(args.image)):
        raise UsageError(
            f"{len(args.question)} --question for {len(args.image)} --image: give one, or one each"
        )
    images = [read_image(path) for path in args.image]  # before the model loads: a bad file fails fast
    qa = VisionQA.load(args.model, device=args.device)
    questions = args.question if len(args.question) == len(images) else args.question * len(images)
    for path, question, answer in zip(args.image, questions, qa.ask(images, questions, args.max_new_tokens)):
        print(f"{path}\t{question}\t{answer}")
    return 0


def _ask_videos(args: argparse.Namespace) -> int:
    from herd.ask import VideoQA

    if len(args.question) not in (1, len(args.video)):
        raise UsageError(
            f"{len(args.question)} --question for {len(args.video)} --video: give one, or one each"
        )
    qa = VideoQA.load(args.model, device=args.device, num_frames=args.frames)
    videos = [qa.read(path) for path in args.video]  # VideoReadError names the file and the reason
    questions = args.question if len(args.question) == len(videos) else args.question * len(videos)
    for path, question, answer in zip(args.video, questions, qa.ask(videos, questions, args.max_new_tokens)):
        print(f"{path}\t{question}\t{answer}")
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Meta or Hugging Face layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: as stored")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)


def register(sub: Any) -> None:
    """Add `generate`, `chat` and `ask` to the top-level subparsers."""
    p = add_command(sub, "generate", cmd_generate, help="plain completion from a checkpoint")
    _add_model_options(p)
    p.add_argument("--prompt", action="append", help="repeatable; prompts are batched (default: stdin)")

    p = add_command(
        sub, "chat", cmd_chat, help="chat with an instruction-tuned checkpoint (Llama 3.1 chat format)"
    )
    _add_model_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--message", action="append", help="scripted user turns instead of an interactive prompt")

    p = add_command(
        sub,
        "ask",
        cmd_ask,
        help="answer questions about images or videos with a trained vision/video checkpoint",
    )
    p.add_argument("--model", required=True, help="vision checkpoint folder (herd train vision / quickstart)")
    p.add_argument("--image", action="append", default=[], help="repeatable; images are batched")
    p.add_argument(
        "--video", action="append", default=[], help="repeatable; videos are batched (a video model)"
    )
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: as trained)")
    p.add_argument("--question", action="append", required=True, help="one per image/video, or one for all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=16)
