"""decoding.json: the copy fields an adapter was trained with, recorded beside it and read back."""

import pytest

from lorakit.errors import ConfigError
from lorakit.files.decoding import (
    DECODING_FILE,
    copy_fields_to_use,
    recorded_copy_fields,
    write_copy_fields,
)


def test_recorded_fields_read_back_and_none_removes_the_record(tmp_path):
    assert recorded_copy_fields(tmp_path) == frozenset()  # nothing recorded: nothing copied
    write_copy_fields(tmp_path, ["item", "deliver_to"])
    assert recorded_copy_fields(tmp_path) == {"item", "deliver_to"}
    write_copy_fields(tmp_path, [])  # a later run without copy fields leaves no stale record
    assert not (tmp_path / DECODING_FILE).exists()


@pytest.mark.parametrize("text", ['{"copy_fields": ["item"', '{"copy_fields": "item"}', '{"copy_fields": [1]}',
                                  '{"copy_fields": [""]}', '["item"]', "\udcff"])
def test_a_damaged_record_is_one_error_that_names_the_file_and_the_way_out(tmp_path, text):
    (tmp_path / DECODING_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=f"{DECODING_FILE}: .*(delete|give --copy-fields)"):
        recorded_copy_fields(tmp_path)


def test_the_flag_wins_and_the_record_is_announced(tmp_path, capsys):
    write_copy_fields(tmp_path, ["item"])
    assert copy_fields_to_use(frozenset({"size"}), tmp_path) == {"size"}
    assert copy_fields_to_use(frozenset(), tmp_path) == frozenset()  # --copy-fields none
    assert capsys.readouterr().err == ""
    assert copy_fields_to_use(None, tmp_path) == {"item"}
    assert "copying item from the message" in capsys.readouterr().err
    assert copy_fields_to_use(None, None) == frozenset()
