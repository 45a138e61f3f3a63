"""Every row of the published bad-input table (tests/bad_inputs.py → docs/errors.md) raises what it says, the CLI
rows exit 2 with the message, and the doc is the table rendered."""

import pytest
from bad_inputs import CASES, DOC, render

import lowrank_rs as lr
from lowrank_rs import errors
from lowrank_rs.cli import main


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.input}" for c in CASES])
def test_bad_input_raises_what_the_table_says(case, tmp_path, capsys):
    cls = getattr(errors, case.error)
    with pytest.raises(lr.LowRankError) as info:
        case.run(tmp_path)
    assert type(info.value) is cls, f"{case.input}: raised {type(info.value).__name__}: {info.value}"
    assert case.sees in str(info.value)
    if case.cli is not None:
        cli_tmp = tmp_path / "cli"
        cli_tmp.mkdir()
        capsys.readouterr()
        assert main(case.cli(cli_tmp)) == 2
        err = capsys.readouterr().err
        # The setup may draw progress bars on stderr too; the error is one line of its own, and no traceback.
        assert any(line.startswith("lowrank-rs: error: ") and case.sees in line for line in err.splitlines()), err
        assert "Traceback" not in err


def test_docs_errors_md_is_the_table():
    assert DOC.read_text() == render(), "docs/errors.md is stale: run `python tests/bad_inputs.py`"
