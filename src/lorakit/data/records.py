"""Reading training records from JSONL. Two shapes are accepted, one per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}

A malformed line is an error that names the file and the line, before any training starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LorakitError

ROLES = ("system", "user", "assistant")


class DataError(LorakitError):
    """A training or evaluation file cannot be used as it is."""


def read_records(path: str | Path) -> list[dict]:
    """Every record of a JSONL file, checked; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                            "each line must be one JSON object") from None
        check_record(record, where)
        records.append(record)
    if not records:
        raise DataError(f"{path}: holds no records; expected one JSON object per line")
    return records


def check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        _check_messages(record["messages"], where)
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string in a prompt/completion record")
    else:
        raise DataError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' strings, "
                        f"found keys {sorted(record)}")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} needs a 'role' of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} ('{message['role']}') needs a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add the reply to train on")
