"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lorakit.argtypes import EXACT_4BIT_HELP, finite_float


def register(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a base model and many adapters over OpenAI's HTTP API",
        description="Serve one base model and any number of adapters (lorakit's or PEFT's) over an "
        "OpenAI-compatible API: POST /v1/chat/completions and /v1/completions (with stream: true), "
        "GET /v1/models, /health, /metrics (Prometheus) and /openapi.json. A request's 'model' is an adapter's "
        "name or the base model's served name; requests on different adapters are decoded in one batch, and "
        "free rows go round-robin across tenants. With --tenants, API keys decide who may use which adapter; "
        "without it the server is open and listens on loopback only. Loading and unloading adapters at run "
        "time always needs the admin key (the tenants file's, or --admin-key). One JSON access-log line per "
        "request goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--base", default="smollm2",
                       help="base model: a model directory, a .gguf file, or smollm2 (the embedded default)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the base model's name for clients (default: its hub id, or its directory's name)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="serve the adapter in DIR as model NAME (repeatable)")
    serve.add_argument("--tenants", type=Path, help="YAML file mapping API keys to tenants, their adapters and "
                       "request limits, plus the admin key")
    serve.add_argument("--admin-key", default=os.environ.get("LORAKIT_ADMIN_KEY"),
                       help="the admin key of a server without --tenants (default: $LORAKIT_ADMIN_KEY); without "
                       "any admin key the admin routes answer 403")
    serve.add_argument("--adapter-dir", type=Path,
                       help="directory the admin may load adapters from at run time (POST /v1/load_lora_adapter)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests that may wait for a row, all tenants together; more are answered 429")
    serve.add_argument("--adapter-memory-mb", type=int, default=1024,
                       help="memory for loaded adapters; least recently used ones are unloaded beyond it")
    serve.add_argument("--max-rank", type=int, default=256, help="highest adapter rank accepted")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted")
    serve.add_argument("--max-tokens", type=int, default=512, help="most tokens a request may ask for")
    serve.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted")
    serve.add_argument("--request-timeout", type=finite_float, default=300.0, metavar="S",
                       help="longest a request may take, from arrival to last token (then 504)")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="the base model's weights and cache. auto (default): bfloat16 where the device multiplies "
                       "it natively (a CPU with AVX512-BF16 or AMX, a GPU that has it) unless --exact-4bit, float32 "
                       "elsewhere. bfloat16 halves what each decoding step reads (1.7-1.9x float32's decoding on a "
                       "2-core CPU, the same exact match on the orders splits: bench/serve_precision.py); greedy "
                       "answers may differ from float32's on near-ties. Adapters stay float32 either way")
    serve.add_argument("--exact-4bit", action="store_true", help=EXACT_4BIT_HELP)
    serve.add_argument("--no-packed-weights", dest="packed_weights", action="store_false",
                       help="keep a float32 base's linear weights in one copy only. By default, on a CPU, they get a "
                       "second copy in oneDNN's blocked layout, whose products decode faster (16 requests: 1.35x "
                       "on a 2-core AMD EPYC, bench/results/serve_cpu.md) for the weights' memory once more")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="connections open at once; requests beyond them are answered 503")
    serve.add_argument("--receive-timeout", type=finite_float, default=30.0, metavar="S",
                       help="longest a client may take to send one whole request (then 408 and the connection closes)")
    serve.add_argument("--keep-alive-timeout", type=finite_float, default=5.0, metavar="S",
                       help="an idle kept-alive connection is closed after this")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.serve.guard import is_loopback
    from lorakit.serve.names import check_adapter_name
    from lorakit.serve.tenants import Tenants

    adapters = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter {spec!r}: write it as NAME=DIR")
        check_adapter_name(name)
        adapters[name] = Path(directory)
    tenants = Tenants.from_yaml(args.tenants) if args.tenants else None
    if tenants is None and not is_loopback(args.host):
        raise ConfigError(f"--host {args.host}: a server without --tenants is open to anyone, so it listens on "
                          "loopback only; give --tenants FILE to listen elsewhere")
    if tenants is not None and args.admin_key:
        raise ConfigError("--admin-key is for a server without --tenants; put admin_key in the tenants file")
    if args.admin_key is not None and len(args.admin_key) < 8:
        raise ConfigError("--admin-key must be at least 8 characters")
    if args.adapter_dir is not None and not args.adapter_dir.is_dir():
        raise ConfigError(f"--adapter-dir {args.adapter_dir}: no such directory")
    if min(args.max_batch, args.max_waiting, args.adapter_memory_mb, args.max_rank, args.max_prompt_tokens,
           args.max_tokens, args.max_body_kb, args.max_connections) < 1:
        raise ConfigError("the --max-* and --adapter-memory-mb limits must be at least 1")
    if not all(0 < t < float("inf") for t in (args.request_timeout, args.receive_timeout, args.keep_alive_timeout)):
        raise ConfigError("--request-timeout, --receive-timeout and --keep-alive-timeout must be positive seconds")
    return _run(args, adapters, tenants)


def _run(args: argparse.Namespace, adapters: dict[str, Path], tenants) -> int:
    import torch

    from lorakit.errors import ConfigError
    from lorakit.models.base import load_for_inference
    from lorakit.serve.app import Limits, create_app, start_service
    from lorakit.serve.server import ConnectionLimits, listening_socket, make_server

    try:
        sock = listening_socket(args.host, args.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); choose another --port") from None
    dtype = served_dtype(args.dtype, args.exact_4bit)
    model, tokenizer = load_for_inference(args.base, None, getattr(torch, dtype), exact_4bit=args.exact_4bit)
    limits = Limits(max_body_bytes=args.max_body_kb * 1024, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, request_timeout_s=args.request_timeout)
    service = start_service(model, tokenizer, adapters, tenants, args.adapter_dir, limits, args.max_batch,
                            args.max_waiting, args.adapter_memory_mb << 20, args.max_rank, args.served_model_name,
                            args.admin_key, args.packed_weights)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    server = make_server(create_app(service), args.host, args.port, limits.max_body_bytes,
                         ConnectionLimits(args.max_connections, args.receive_timeout, args.keep_alive_timeout))
    names = ", ".join(f"{n} ({service.registry.info(n).load_ms:.0f} ms to load)" for n in service.registry.names())
    admin = "admin key set" if (tenants is not None or args.admin_key) else "admin routes off (no admin key)"
    print(f"lorakit serve: http://{args.host}:{args.port}/v1  base model {service.base_name!r}; adapters: "
          f"{names or 'none'}; {dtype} weights{_packed_note(service.engine)}; {'tenants from ' + str(args.tenants) if tenants else 'open (no API keys)'}; {admin}",
          file=sys.stderr)
    try:
        server.run(sockets=[sock])
    finally:
        service.engine.stop()
        sock.close()
    return 0


def _packed_note(engine) -> str:
    """What packing the weights for oneDNN took (or why it did not happen), for the start-up line."""
    if engine.packed is None:
        return ""
    if engine.packed.declined_bytes:
        return f" (not packed for oneDNN: {engine.packed.declined_bytes / 2**20:.0f} MiB more would not fit in memory)"
    if engine.packed.nbytes:
        return f" (+{engine.packed.nbytes / 2**20:.0f} MiB packed for oneDNN; --no-packed-weights: none)"
    return ""


def served_dtype(name: str, exact_4bit: bool) -> str:
    """``--dtype`` resolved: "auto" is bfloat16 where the serving device multiplies it natively, but
    float32 with ``exact_4bit``, whose de-quantized reference is float32."""
    import torch

    from lorakit.train.precision import resolved_compute_dtype

    if name == "auto" and exact_4bit:
        return "float32"
    return resolved_compute_dtype(name, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
