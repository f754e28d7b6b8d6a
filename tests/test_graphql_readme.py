"""The README's GraphQL snippets run as copied: plain graphql-core, strawberry and ariadne.

Each snippet loads the authors of three books and prints the data; it must send one call
with both authors. strawberry and ariadne are not in the test extra (graphene-django pins
graphql-core 3.2, and strawberry needs 3.3): .ci/run installs them in a second
environment with graphql-core 3.3 and runs the GraphQL tests there.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import re
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("graphql")

from batchsync import Batcher

README = Path(__file__).resolve().parent.parent / "README.md"
DATA = {
    "books": [
        {"title": "Notes", "author": {"name": "Ada Lovelace"}},
        {"title": "COBOL", "author": {"name": "Grace Hopper"}},
        {"title": "More notes", "author": {"name": "Ada Lovelace"}},
    ]
}


def snippets() -> dict[str, str]:
    """The python blocks of the GraphQL section that run alone, by the server they use."""
    text = README.read_text()
    section = text.split("\n## GraphQL: `batchsync.graphql`\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        for name in ("strawberry", "ariadne"):
            if re.search(rf"^(import|from) {name}\b", block, re.M):
                break
        else:
            name = "graphene" if "DjangoObjectType" in block else "graphql-core"
        found.setdefault(name, block)
    return found


def run(source: str) -> str:
    """Run source as a module of its own (strawberry looks its types up there); its output."""
    module = types.ModuleType("readme_snippet")
    sys.modules[module.__name__] = module
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, "README.md", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
        for value in module.__dict__.values():  # the snippet's loaders live for the process
            if isinstance(value, Batcher):
                value.close()
    return out.getvalue()


def test_the_section_has_each_snippet() -> None:
    assert set(snippets()) == {"graphql-core", "graphene", "strawberry", "ariadne"}


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("graphql-core", "graphql"),
        ("strawberry", "strawberry"),
        ("ariadne", "ariadne"),
    ],
)
def test_a_snippet_loads_both_authors_in_one_call(name: str, needs: str) -> None:
    if os.environ.get("BATCHSYNC_GRAPHQL_33") and importlib.util.find_spec(needs) is None:
        pytest.fail(f"BATCHSYNC_GRAPHQL_33 is set and {needs} is not installed")
    pytest.importorskip(
        needs, reason=f"{needs} is installed by .ci/run's graphql-core 3.3 environment"
    )
    lines = run(snippets()[name]).splitlines()
    assert lines[0] == "load_authors [1, 2]"
    assert ast.literal_eval(lines[1]) == DATA
    assert len(lines) == 2
