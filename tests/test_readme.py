"""The READMEs point at things that exist: their in-page anchors name headings, their relative links
and the repository paths they quote in backticks are files or folders of the checkout."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", "results/README.md", "launch/README.md")
EXAMPLES = {"results/my_sweep/", "results/own_features/"}  # output folders the README's examples would make
QUOTED_PATH = re.compile(r"^(results|configs|tests|launch|fusion_jax)/[\w./\-]+$")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("readme", READMES)
def test_readme_links_and_paths_exist(readme):
    text = open(os.path.join(ROOT, readme), encoding="utf-8").read()
    here = os.path.dirname(os.path.join(ROOT, readme))
    headings = {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
    assert headings, readme
    broken = [f"#{a}" for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in headings]
    broken += [link for link in re.findall(r"\]\(([^)#]+)\)", text)
               if not link.startswith(("http://", "https://")) and not os.path.exists(os.path.join(here, link))]
    for quoted in re.findall(r"`([^`\s]+)`", text):
        path = quoted.split(":")[0]  # configs/demo.py:smoke
        if QUOTED_PATH.match(path) and not re.search(r"[<>*{}]", path) and quoted not in EXAMPLES:
            if not any(os.path.exists(os.path.join(base, path)) for base in (ROOT, here)):
                broken.append(quoted)
    assert not broken, f"{readme} points at what is not there: {broken}"
