"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path


def register(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a base model and many adapters over OpenAI's HTTP API",
        description="Serve one base model and any number of adapters (lorakit's or PEFT's) over an "
        "OpenAI-compatible API: POST /v1/chat/completions and /v1/completions (with stream: true), "
        "GET /v1/models and /health. A request's 'model' is an adapter's name or the base model's; requests "
        "on different adapters are decoded in one batch. With --tenants, API keys decide who may use which "
        "adapter; without it the server is open and listens on loopback only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--base", default="smollm2",
                       help="base model: a model directory, a .gguf file, or smollm2 (the embedded default)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="serve the adapter in DIR as model NAME (repeatable)")
    serve.add_argument("--tenants", type=Path, help="YAML file mapping API keys to tenants and their adapters")
    serve.add_argument("--adapter-dir", type=Path,
                       help="directory the admin may load adapters from at run time (POST /v1/load_lora_adapter)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests that may wait for a row; more are answered 429")
    serve.add_argument("--adapter-memory-mb", type=int, default=1024,
                       help="memory for loaded adapters; least recently used ones are unloaded beyond it")
    serve.add_argument("--max-rank", type=int, default=256, help="highest adapter rank accepted")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted")
    serve.add_argument("--max-tokens", type=int, default=512, help="most tokens a request may ask for")
    serve.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.generate import load_for_inference
    from lorakit.serve.http import Limits, make_server, start_app
    from lorakit.serve.tenants import Tenants

    adapters = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter {spec!r}: write it as NAME=DIR")
        adapters[name] = Path(directory)
    tenants = Tenants.from_yaml(args.tenants) if args.tenants else None
    if tenants is None and not _is_loopback(args.host):
        raise ConfigError(f"--host {args.host}: a server without --tenants is open to anyone, so it listens on "
                          "loopback only; give --tenants FILE to listen elsewhere")
    if args.adapter_dir is not None and not args.adapter_dir.is_dir():
        raise ConfigError(f"--adapter-dir {args.adapter_dir}: no such directory")
    if min(args.max_batch, args.max_waiting, args.adapter_memory_mb, args.max_rank, args.max_prompt_tokens,
           args.max_tokens, args.max_body_kb) < 1:
        raise ConfigError("the --max-* and --adapter-memory-mb limits must be at least 1")
    model, tokenizer = load_for_inference(args.base, None)
    limits = Limits(max_body_bytes=args.max_body_kb * 1024, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens)
    app = start_app(model, tokenizer, adapters, tenants, args.adapter_dir, limits, args.max_batch, args.max_waiting,
                    args.adapter_memory_mb << 20, args.max_rank)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({err.strerror})") from None
    names = ", ".join(f"{n} ({app.registry.info(n).load_ms:.0f} ms to load)" for n in app.registry.names()) or "none"
    print(f"lorakit serve: http://{args.host}:{args.port}/v1  base model {app.base_name!r}; adapters: {names}; "
          f"{'tenants from ' + str(args.tenants) if tenants else 'open (no API keys)'}", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.engine.stop()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
