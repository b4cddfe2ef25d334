"""docs/megatron-flags.md: generated from the config, current, and naming only real flags of
bigscience-workshop/Megatron-DeepSpeed (its megatron/arguments.py, kept as test data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron.config_flags import INVERTED, OURS, RENAMED, config_fields, flag_rows, render_markdown

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "megatron-flags.md"
FLAGS = REPO / "tests" / "fixtures" / "megatron_deepspeed" / "arguments_flags.txt"


def megatron_deepspeed_flags() -> set[str]:
    return {line for line in FLAGS.read_text().splitlines() if line.startswith("--")}


def test_the_table_is_what_the_config_generates():
    assert DOC.read_text(encoding="utf-8") == render_markdown(), \
        "docs/megatron-flags.md is stale: run python tools/megatron_flags.py"


def test_every_flag_in_the_table_exists_in_megatron_deepspeed():
    known = megatron_deepspeed_flags()
    assert len(known) > 150 and {"--num-layers", "--eval-only", "--pad-vocab-size-to"} <= known
    unknown = [(row.flag, row.field) for row in flag_rows() if row.flag not in known]
    assert not unknown, (f"{unknown}: Megatron-DeepSpeed has no such flag; name the field after one, or list it "
                         "in megatron/config_flags.py (OURS, or RENAMED with the flag it has)")


def test_every_field_is_in_the_table_or_declared_our_own():
    fields = {path for path, _ in config_fields()}
    assert set(RENAMED) | set(INVERTED) | OURS <= fields, "megatron/config_flags.py names fields the config lacks"
    listed = {row.field for row in flag_rows()}
    assert listed | OURS == fields and not listed & OURS
    assert all(f"`{path}`" in DOC.read_text() for path in fields)


def test_check_mode_detects_a_stale_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tool_megatron_flags", REPO / "tools" / "megatron_flags.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stale = tmp_path / "flags.md"
    stale.write_text(render_markdown().replace("`--num-layers`", "`--num-layer`"))
    assert tool.main(["--check", "--output", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert tool.main(["--check", "--output", str(DOC)]) == 0
