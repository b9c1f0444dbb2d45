"""Torch files: atomic writes, and reads that turn every kind of bad file into one line."""

from __future__ import annotations

import pytest
import torch

from cfrobust.errors import UserError
from cfrobust.files import load_torch_safely, one_line_reason, save_torch_atomically


def test_a_saved_file_loads_back_and_leaves_no_temporary(tmp_path):
    save_torch_atomically({"w": torch.arange(3)}, tmp_path / "a.pt")
    assert load_torch_safely(tmp_path / "a.pt", "checkpoint")["w"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "{p}: no such checkpoint"),
    (lambda p: p.mkdir(), "{p}: a directory, not a checkpoint"),
    (lambda p: p.write_bytes(b""), "{p}: not a readable checkpoint (EOFError)"),
])
def test_missing_directory_and_empty_files_are_named_in_one_line(tmp_path, make, expected):
    path = tmp_path / "ckpt.pt"
    make(path)
    with pytest.raises(UserError) as caught:
        load_torch_safely(path, "checkpoint")
    assert str(caught.value) == expected.format(p=path)


def test_a_pickle_that_runs_code_is_refused_with_its_first_line(tmp_path):
    torch.save({"f": print}, tmp_path / "evil.pt")  # a function, not weights: weights_only refuses it
    with pytest.raises(UserError) as caught:
        load_torch_safely(tmp_path / "evil.pt", "CAGAN weight file")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'evil.pt'}: not a readable CAGAN weight file (UnpicklingError: ")
    assert "\n" not in message


def test_reasons_lose_colour_codes_and_blank_lines():
    assert one_line_reason(RuntimeError("\n\n  \x1b[31mbad\x1b[0m header\nmore")) == "RuntimeError: bad header"
    assert one_line_reason(ValueError("x" * 300)) == "ValueError: " + "x" * 120 + " ..."
    assert one_line_reason(ValueError("abcdefghi " * 30)) == "ValueError: " + " ".join(["abcdefghi"] * 12) + " ..."
    assert one_line_reason(KeyError()) == "KeyError"
