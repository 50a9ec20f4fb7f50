"""`lorakit generate` (one reply per message) and `lorakit chat` (a conversation), with an adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit.argtypes import (
    COPY_FIELDS_HELP,
    EXACT_4BIT_HELP,
    JSON_HELP,
    field_names,
    finite_float,
)


def register(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="reply to messages with the base model and an adapter",
        description="Reply to each MESSAGE as a user turn in the model's chat template (or continue it as "
        "plain text with --raw), with the adapter if given.",
    )
    generate.add_argument("messages", nargs="+", metavar="MESSAGE", help="user message(s); each gets its own reply")
    generate.add_argument("--raw", action="store_true", help="continue the text as it is, without the chat template")
    _common(generate)
    generate.set_defaults(run=_generate)

    chat = commands.add_parser(
        "chat",
        help="talk to the base model with an adapter, interactively",
        description="An interactive conversation. Type /reset to start over, /exit (or Ctrl-D) to leave.",
    )
    chat.add_argument("--system", help="a system message to open the conversation with")
    _common(chat)
    chat.set_defaults(run=_chat)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", type=Path, help="adapter directory (none: the base model alone)")
    parser.add_argument("--base", help="base model: a model directory, a .gguf file, or smollm2 (the embedded "
                        "default, used when --base is left out); leave it out for a fully fine-tuned --adapter")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=finite_float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--unmerged", action="store_true",
                        help="compute a LoRA adapter beside the base layers, as trained, instead of merged into them "
                        "for the run (merged decodes at the base model's speed; for a 4-bit QA-LoRA adapter the "
                        "merge rounds the shifted mins to float16, as lorakit eval's does)")
    parser.add_argument("--exact-4bit", action="store_true", help=EXACT_4BIT_HELP)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.add_argument("--copy-fields", type=field_names, metavar="KEYS", help=COPY_FIELDS_HELP)


def _check(args: argparse.Namespace) -> None:
    """Refuses bad settings and settles the copy fields (the flag's, or the adapter's recorded ones)."""
    from lorakit.errors import ConfigError
    from lorakit.files.decoding import copy_fields_to_use

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0, and --top-p in (0, 1]")
    args.copy_fields = copy_fields_to_use(args.copy_fields, args.adapter)


def _load(args: argparse.Namespace):
    """(model, tokenizer) as the commands decode with them: a LoRA adapter merged into its layers
    (unless --unmerged), float32 weights on a CPU packed for faster products, until the command ends."""
    from lorakit.core.merge import merge
    from lorakit.models.base import load_for_inference
    from lorakit.models.packed_weights import PackedLinearWeights

    model, tokenizer = load_for_inference(args.base, args.adapter, exact_4bit=args.exact_4bit)
    if not args.unmerged:
        merge(model)  # no LoRA layers (no adapter, another method): nothing to merge
    PackedLinearWeights(model)
    return model, tokenizer


def _generate(args: argparse.Namespace) -> int:
    from lorakit.generation.generate import generate_texts
    from lorakit.generation.prompts import chat_prompt

    _check(args)
    model, tokenizer = _load(args)
    prompts = args.messages if args.raw else [
        chat_prompt(tokenizer, [{"role": "user", "content": m}]) for m in args.messages]
    replies = generate_texts(model, tokenizer, prompts, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, json_object=args.json, copy_fields=args.copy_fields)
    for message, reply in zip(args.messages, replies, strict=True):
        if len(args.messages) > 1:
            print(f"> {message}")
        print(reply.strip())
    return 0


def _chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from lorakit.generation.generate import generate_texts
    from lorakit.generation.prompts import chat_prompt

    _check(args)
    model, tokenizer = _load(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("lorakit chat: /reset starts over, /exit leaves", file=sys.stderr)
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            history = list(opening)
            continue
        if not message:
            continue
        history.append({"role": "user", "content": message})
        print("model> ", end="", flush=True)
        reply = generate_texts(model, tokenizer, [chat_prompt(tokenizer, history)], args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, streamer=streamer,
                               json_object=args.json, copy_fields=args.copy_fields)[0]
        history.append({"role": "assistant", "content": reply.strip()})
