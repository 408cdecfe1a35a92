"""docs/robustness.md: every case names a test that exists."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_case_in_the_table_names_an_existing_test():
    rows = [line for line in (REPO / "docs" / "robustness.md").read_text().splitlines() if line.startswith("| ")][2:]
    assert len(rows) >= 30
    for row in rows:
        ref = re.search(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert ref, f"no test named in: {row}"
        source = (REPO / ref.group(1)).read_text()
        assert f"def {ref.group(2)}(" in source, f"{ref.group(1)} has no {ref.group(2)}"
