"""`lorakit train`: fine-tune an adapter (LoRA, or another --method) from a YAML recipe, any field overridable by flag."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lorakit.train import config as train_config


def register(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="fine-tune a LoRA adapter (or another --method) on chat or prompt/completion JSONL",
        description="Fine-tune a LoRA adapter, or adapt the model another way (--method full, prompt, prefix, ia3 "
        "or adapter; `lorakit compare` trains several side by side). Settings come from --config (a YAML recipe such as "
        "configs/smollm2-orders.yaml), then from flags, which override it. Writes the adapter (PEFT format; "
        "bottleneck adapters in lorakit's own; a whole model directory for full fine-tuning), metrics.jsonl, loss.png and checkpoints to --output. Loss is taken on assistant tokens (or the "
        "completion) only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML recipe; its keys are the settings below")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last checkpoint, exactly as if never stopped")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    parser.add_argument("--stop-after", type=int, metavar="STEPS",
                        help="stop after this many optimizer steps in total, leaving a checkpoint to --resume "
                        "(the schedule still spans the full run)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train on N processes of this machine, launched by torchrun's agent (gloo on CPU with "
                        "cores/N threads each, NCCL on CUDA with one GPU each; --parallel chooses DDP or FSDP); the "
                        "same as `torchrun --nproc-per-node N -m lorakit train ...`, whose rendezvous flags also run "
                        "it across machines")
    settings = parser.add_argument_group("settings (override the recipe)")
    train_config.add_arguments(settings)
    parser.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, args.argv)
    from lorakit.train.checkpoint import latest_checkpoint
    from lorakit.train.loop import train

    saved = None
    if args.resume:  # the run's own settings, so `--resume --output DIR` alone is enough
        output = train_config.from_sources(args.config, args).output
        checkpoint = latest_checkpoint(Path(output))
        saved = checkpoint.config if checkpoint else None
    config = train_config.from_sources(args.config, args, saved)
    result = train(config, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, process 0 reports
        return 0
    if result.steps < result.total_steps:
        print(f"stopped after step {result.steps}; continue with: lorakit train --resume "
              f"--output {result.output}", file=sys.stderr)
    else:
        val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"adapter written to {result.output}{val}; curve in {result.output / 'loss.png'}")
    return 0


def _launch(processes: int, argv: list[str]) -> int:
    """Run this same command on ``processes`` local processes under torchrun's agent (in this process,
    with a free port each time). A process that fails has printed why; the agent's own report of
    the failure (a log line and a traceback) becomes one line."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    rest, skip = [], False
    for arg in argv:  # the command line without --nproc: each process is one of the N
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    # torchrun gives each process one CPU thread unless told; share the machine's cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(processes),
                                          "-m", "lorakit", *rest]))
    except ChildFailedError as failed:
        # The cause: a process killed by a signal (the others then fail in their next collective step),
        # else the first to fail.
        rank, failure = min(failed.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp))
        if failure.exitcode != 2:  # 2: a user's mistake, already told as "[rank N] error: ..."
            print(f"error: training process {rank} {_ended(failure.exitcode)}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _ended(exitcode: int) -> str:
    if exitcode < 0:
        import signal

        return f"was killed by {signal.Signals(-exitcode).name}" + (" (out of memory?)" if exitcode == -9 else "")
    return f"exited with status {exitcode}; its error is above"
