"""`herd generate`, `herd chat`, `herd guard`, `herd ask`: inference with a checkpoint.

    herd generate --model runs/x/model --prompt "Count: one two" --max-new-tokens 8
    herd generate --model runs/x/model --prompt "Hi" --compile --fp8   # compiled static-cache steps, FP8 FFNs
    herd chat --model runs/sft/model --system "be brief" --message "hi"
    herd chat --model runs/sft/model --guard runs/guard/model        # Llama Guard 3 screens both sides
    herd guard --model runs/guard/model --text "How do I steal a car?"   # exit status 1 when unsafe
    herd ask --model runs/quickstart/vision_model --image shapes.png --question "How many shapes?"
    herd ask --model runs/quickstart/speech_model --audio a.wav --audio b.wav      # transcribes both
    herd serve --model runs/quickstart/vision_model --port 8000 --api-key KEY      # OpenAI-compatible API

Python: `herd.text.generation.generate_text`, `herd.text.chat.ChatSession`, `herd.ask.VisionQA`,
`herd.guard.Guard` / `GuardedChat`.
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
    prompts = args.prompt or [sys.stdin.read()]
    if args.pp > 1:
        return _generate_pipelined(args, prompts)
    from herd.fast_decode import load_for_decoding
    from herd.text.generation import generate_text

    model, tokenizer, steps = load_for_decoding(args.model, args.device, args.dtype, args.compile, args.fp8)
    completions = generate_text(model, tokenizer, prompts, _sampling(args), steps=steps)
    for prompt, completion in zip(prompts, completions):
        print(prompt + completion)
    return 0


def _generate_pipelined(args: argparse.Namespace, prompts: list[str]) -> int:
    """`herd.pipelined_generate.generate_text_pipelined` (under torchrun); rank 0 prints."""
    from herd.pipelined_generate import generate_text_pipelined

    if args.compile or args.fp8:
        raise UsageError("--pp runs the eager decode step: drop --compile / --fp8")
    if args.microbatches < 1:
        raise UsageError(f"--microbatches must be ≥ 1, not {args.microbatches}")
    completions = generate_text_pipelined(args.model, prompts, _sampling(args), args.pp, args.microbatches,
                                          args.device, args.dtype)  # fmt: skip
    for prompt, completion in zip(prompts, completions or []):
        print(prompt + completion)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A `herd.text.chat.ChatSession`: scripted turns (--message) or an interactive prompt; with --guard a
    `herd.guard.GuardedChat`, Llama Guard 3 screening both sides of every turn."""
    from herd.fast_decode import load_for_decoding
    from herd.guard import Guard, GuardedChat
    from herd.text.chat import ChatSession

    # the guard first: a bad --guard-categories or guard checkpoint fails before the chat model loads
    guard = Guard.load(args.guard, args.guard_categories, args.device, args.dtype) if args.guard else None
    model, tokenizer, steps = load_for_decoding(args.model, args.device, args.dtype, args.compile, args.fp8)
    session: Any = ChatSession(model, tokenizer, system=args.system, params=_sampling(args), steps=steps)
    if guard is not None:
        session = GuardedChat(session, guard)
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

    if sum(map(bool, (args.image, args.video, args.audio))) != 1:
        raise UsageError("give --image, --video or --audio (repeatable), one kind and not none")
    if args.audio:
        return _ask_audio(args)
    if not args.question:
        raise UsageError("--question is required with --image and --video")
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


def _ask_audio(args: argparse.Namespace) -> int:
    """Without --question each clip is transcribed (`--transcribe`, the default) or, with --answer, taken
    as a spoken question and answered; --question TEXT puts TEXT before the clip."""
    from herd.ask import SpeechQA

    if args.question and len(args.question) not in (1, len(args.audio)):
        raise UsageError(
            f"{len(args.question)} --question for {len(args.audio)} --audio: give one, or one each"
        )
    clips = [SpeechQA.read(path) for path in args.audio]  # AudioError names the file and the reason
    qa = SpeechQA.load(args.model, device=args.device)
    if args.question:
        prompts = args.question if len(args.question) == len(clips) else args.question * len(clips)
    else:
        prompts = [None if args.answer else qa.transcribe_prompt()] * len(clips)
    replies = qa.ask(clips, list(prompts), args.max_new_tokens, after=args.after)
    for path, prompt, reply in zip(args.audio, prompts, replies):
        print(f"{path}\t{prompt or ''}\t{reply}")
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    """`herd.guard.Guard.check_user` (or `check_response` with --response): one line, `safe` or
    `unsafe<TAB>codes<TAB>refusal`; exit status 1 when unsafe, so scripts can branch on it."""
    from herd.guard import Guard, refusal, select_categories

    select_categories(args.categories)  # a bad --categories fails before the model loads
    text = args.text if args.text is not None else sys.stdin.read()
    guard = Guard.load(args.model, args.categories, device=args.device, dtype=args.dtype)
    messages = [{"role": "user", "content": text}]
    if args.response is None:
        verdict = guard.check_user(messages)
    else:
        verdict = guard.check_response(messages, args.response)
    if verdict.safe:
        print("safe")
        return 0
    print(f"unsafe\t{','.join(verdict.categories)}\t{refusal(verdict)}")
    return 1


def cmd_serve(args: argparse.Namespace) -> int:
    """`herd.serving.server.serve`: the OpenAI chat-completions API over any herd checkpoint."""
    from herd.guard import select_categories
    from herd.serving.server import ServeOptions, serve

    for name in ("max_upload_mb", "max_batch", "max_queue", "max_tokens", "guard_every_chars"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    select_categories(args.guard_categories)  # a bad code fails before any model loads
    options = ServeOptions(args.host, args.port, args.max_upload_mb, args.api_key, args.guard, args.max_batch,
                           args.max_queue, args.max_tokens, args.guard_every_chars, args.guard_categories)  # fmt: skip
    options.prompt_format = args.prompt_format
    return serve(args.model, options, device=args.device, fp8=args.fp8)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Meta or Hugging Face layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: as stored")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="static KV cache + torch.compile'd decode step "
                   "(CUDA graphs on a GPU); the first call compiles")  # fmt: skip
    p.add_argument("--fp8", action="store_true", help="row-wise FP8 feed-forward layers (paper §6.2): "
                   "torchao on an H100/H200, an exact emulation elsewhere")  # fmt: skip


def register(sub: Any) -> None:
    """Add `generate`, `chat`, `guard`, `ask` and `serve` to the top-level subparsers."""
    p = add_command(sub, "generate", cmd_generate, help="plain completion from a checkpoint")
    _add_model_options(p)
    p.add_argument("--prompt", action="append", help="repeatable; prompts are batched (default: stdin)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (under torchrun, one rank each)")
    p.add_argument("--microbatches", type=int, default=1, help="with --pp: micro-batches in flight")

    p = add_command(
        sub, "chat", cmd_chat, help="chat with an instruction-tuned checkpoint (Llama 3.1 chat format)"
    )
    _add_model_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--message", action="append", help="scripted user turns instead of an interactive prompt")
    p.add_argument(
        "--guard", default=None, help="a Llama Guard 3 checkpoint that screens each user turn and reply"
    )
    p.add_argument(
        "--guard-categories", default=None, help="categories the guard enforces, e.g. S1,S14 (default: all)"
    )

    p = add_command(
        sub,
        "guard",
        cmd_guard,
        help="classify a user message (or, with --response, a reply) with a Llama Guard 3 checkpoint",
    )
    p.add_argument("--model", required=True, help="Llama Guard 3 checkpoint (Meta or Hugging Face layout)")
    p.add_argument("--text", default=None, help="the user message (default: stdin)")
    p.add_argument("--response", default=None, help="the assistant's reply to check instead of the message")
    p.add_argument("--categories", default=None, help="codes to enforce, e.g. S1,S10,S14 (default: all 14)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: as stored")

    p = add_command(
        sub,
        "ask",
        cmd_ask,
        help="answer questions about images, videos or audio with a trained vision/video/speech checkpoint",
    )
    p.add_argument("--model", required=True, help="vision, video or speech checkpoint folder (herd train …)")
    p.add_argument("--image", action="append", default=[], help="repeatable; images are batched")
    p.add_argument(
        "--video", action="append", default=[], help="repeatable; videos are batched (a video model)"
    )
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: as trained)")
    p.add_argument(
        "--audio", action="append", default=[], help="repeatable; clips are batched (a speech model)"
    )
    p.add_argument("--question", action="append", default=[], help="one per file, or one for all")
    p.add_argument(
        "--answer", action="store_true", help="audio without --question: answer the spoken question "
        "instead of transcribing it"
    )  # fmt: skip
    p.add_argument("--after", default="", help="audio: text between the clip and the reply")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=16)

    p = add_command(sub, "serve", cmd_serve, help="serve a checkpoint over the OpenAI chat-completions API")
    p.add_argument("--model", required=True, help="text, vision/video or speech checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit (413 beyond)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument(
        "--guard", default=None, help="Llama Guard checkpoint for herd.guard (input/output filter)"
    )
    p.add_argument(
        "--guard-categories", default=None, help="categories the guard enforces, e.g. S1,S14 (default: all)"
    )
    p.add_argument("--guard-every-chars", type=int, default=160,
                   help="a streamed reply is screened (and released) per this many new characters")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="requests that share a decode step")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on any request's max_tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp8", action="store_true", help="row-wise FP8 feed-forward layers (paper §6.2)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"],
                   help="chat: Llama 3 chat format; plain: the prompts herd's adapter tasks train on and "
                   "`herd ask` writes (default auto: chat for text checkpoints, plain for adapters)")  # fmt: skip
