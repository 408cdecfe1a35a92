"""docs/robustness.md and docs/exactness.md: every row names tests that exist."""
import re

import pytest

from tests.helpers import REPO


def table_rows(doc: str) -> list[str]:
    return [line for line in (REPO / "docs" / doc).read_text().splitlines() if line.startswith("| ")][2:]


def assert_named_tests_exist(row: str) -> None:
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
    assert refs, f"no test named in: {row}"
    for path, name in refs:
        source = (REPO / path).read_text() if (REPO / path).exists() else ""
        assert f"def {name}(" in source, f"{path} has no {name}"


def test_every_case_in_the_table_names_an_existing_test():
    rows = table_rows("robustness.md")
    assert len(rows) >= 30
    for row in rows:
        assert_named_tests_exist(row)


@pytest.mark.parametrize("row", table_rows("exactness.md"))
def test_every_guarantee_in_the_exactness_table_names_an_existing_test(row):
    assert re.match(r"\| \d+ \| ", row), f"the first column is the guarantee's number: {row}"
    assert_named_tests_exist(row)
