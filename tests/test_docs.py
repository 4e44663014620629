"""The docs a newcomer reads: a short README that starts with the two commands, links that resolve."""
from __future__ import annotations

from conftest import REPO


def test_the_readme_is_short_starts_with_the_two_commands_and_its_links_exist():
    import re

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0].split()
    assert first_block == ["./run.sh", "demo", "./run.sh", "test"]
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "RESULTS.md", REPO / "BENCHMARKS.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: link to {target} does not exist"
        assert not re.search(r"\b(session|issue) \d|\.\./shared|/work/", doc.read_text()), doc.name
