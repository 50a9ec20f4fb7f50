"""Reading JSONL records: both shapes accepted, every malformed line named by file and line."""

import json

import pytest

from lorakit.data.records import DataError, read_records

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_chat_and_prompt_completion_and_skips_blank_lines(tmp_path):
    pc = {"prompt": "2+2=", "completion": "4"}
    path = _write(tmp_path / "d.jsonl", [json.dumps(CHAT), "", json.dumps(pc)])
    assert read_records(path) == [CHAT, pc]


@pytest.mark.parametrize(("line", "problem"), [
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "hi"}', "expected a 'messages' list or 'prompt' and 'completion'"),
    ('{"messages": []}', "must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 needs a 'role'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "needs a string 'content'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"prompt": "x"}', "'completion' must be a string"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, problem):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(CHAT), line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{problem}"):
        read_records(path)


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="holds no records"):
        read_records(_write(tmp_path / "empty.jsonl", [""]))
