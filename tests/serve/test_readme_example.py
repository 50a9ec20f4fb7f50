"""The README's openai client example runs as written against a server on 127.0.0.1."""

import contextlib
import io
import re
from pathlib import Path

README = (Path(__file__).parent.parent.parent / "README.md").read_text()


def test_the_readme_client_example_runs(server):
    _, port, _ = server
    example = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL) if "openai.OpenAI(" in b)
    assert "127.0.0.1:8000" in example
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(example.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), {})  # noqa: S102 - the README's own code
    assert printed.getvalue().strip()  # a reply, then a streamed reply
