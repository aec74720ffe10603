"""MkDocs hook: pages that are files of the repository root, included and their links rewritten.

docs/contributing.md is the line ``--8<-- "CONTRIBUTING.md"``: the hook puts CONTRIBUTING.md there
(one copy of the text, kept where GitHub shows it) and rewrites its links, which are relative to the
repository root (``docs/cuda.md``, ``README.md#two-commands``), to the site's pages (``cuda.md``, and
the home page for the README). A missing file is an error, so the strict build fails on it.
"""

import pathlib
import re

_INCLUDE = re.compile(r'^--8<-- "([^"/]+\.md)"\s*$', re.MULTILINE)


def on_page_markdown(markdown, page, config, files):
    root = pathlib.Path(config["config_file_path"]).parent

    def include(match):
        text = (root / match.group(1)).read_text(encoding="utf-8")
        text = re.sub(r"\]\(docs/", "](", text)
        return re.sub(r"\]\(README\.md", "](index.md", text)

    return _INCLUDE.sub(include, markdown)
