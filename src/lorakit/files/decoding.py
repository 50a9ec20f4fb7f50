"""decoding.json beside an adapter: how its answers were trained to be decoded.

An adapter trained with copy_fields (data/copy_aligned.py) answers best with the same fields
copy-constrained (generation/copy_constraint.py): on the demo, test exact match is 197/200 with
them and 187/200 without. The fields are recorded beside the adapter, so that eval, generate and
chat use them unless told otherwise. PEFT and other readers of the directory ignore the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.files.atomic import atomic_write_text

DECODING_FILE = "decoding.json"


def write_copy_fields(directory: Path, fields: list[str] | frozenset[str]) -> None:
    """Records ``fields`` beside the adapter in ``directory``; none removes an earlier record."""
    path = Path(directory) / DECODING_FILE
    if fields:
        atomic_write_text(path, json.dumps({"copy_fields": sorted(fields)}) + "\n")
    else:
        path.unlink(missing_ok=True)


def recorded_copy_fields(directory: Path) -> frozenset[str]:
    """The copy fields recorded beside the adapter in ``directory`` (none if nothing is recorded)."""
    path = Path(directory) / DECODING_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); delete it, or give --copy-fields") from None
    fields = record.get("copy_fields") if isinstance(record, dict) else None
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        raise ConfigError(f"{path}: copy_fields must be a list of JSON keys; delete the file, or give --copy-fields")
    return frozenset(fields)


def copy_fields_to_use(given: frozenset[str] | None, adapter: Path | None) -> frozenset[str]:
    """``given`` (the --copy-fields flag; empty means off), or else the adapter's recorded fields,
    announced on stderr."""
    if given is not None or adapter is None:
        return given or frozenset()
    fields = recorded_copy_fields(adapter)
    if fields:
        print(f"lorakit: copying {','.join(sorted(fields))} from the message, as {adapter} was trained "
              "(--copy-fields none: off)", file=sys.stderr)
    return fields
