"""The server as the optional extra ``hub_msif[server]`` (issue 20, 1): without starlette and uvicorn,
``hub serve`` and the demo's publishing say in one line what to install, and ``hub gc`` still works.

Each case runs in a fresh interpreter where ``import starlette`` and ``import uvicorn`` fail (``None``
in ``sys.modules``, as for a package that is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HINT = "pip install 'hub_msif[server]'"
WITHOUT_THE_EXTRA = "import sys\nsys.modules['starlette'] = None\nsys.modules['uvicorn'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_THE_EXTRA + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_hub_serve_without_the_extra_is_one_line_naming_it(tmp_path):
    root = tmp_path / "hub"
    result = _run(f"""
        from hub_msif.apps.cli import main
        sys.exit(main(["hub", "serve", "--root", {str(root)!r}, "--port", "0", "--token", "t=alice"]))
    """)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hub-msif hub: error:") and HINT in lines[0]
    assert "starlette" in lines[0]


def test_hub_gc_needs_no_extra(tmp_path):
    (tmp_path / "hub").mkdir()
    result = _run(f"""
        from hub_msif.apps.cli import main
        code = main(["hub", "gc", "--root", {str(tmp_path / "hub")!r}, "--json"])
        assert "starlette" not in sys.modules or sys.modules["starlette"] is None
        sys.exit(code)
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == 0


def test_the_demo_does_not_publish_without_the_extra_and_says_why(tmp_path):
    result = _run(f"""
        from pathlib import Path
        from hub_msif.toy.demo import publish_and_pull
        lines = []
        assert publish_and_pull({{}}, Path({str(tmp_path)!r}), echo=lines.append) is None
        print("\\n".join(lines))
    """)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("(not publishing: the local Hub server needs starlette") and HINT in line


def test_the_server_package_names_the_extra_only_for_the_server():
    result = _run("""
        import hub_msif.hub.server as server
        from hub_msif.errors import MissingExtraError
        assert server.parse_token_spec("t=alice")[0] == "t"
        try:
            server.HubServer
        except MissingExtraError as err:
            print(err)
        else:
            raise SystemExit("HubServer imported without starlette")
    """)
    assert result.returncode == 0, result.stderr
    assert HINT in result.stdout
