"""Run every bad input of tests/badinputs.py through the CLI and print the
Markdown table of what each prints (case, command, exit code, message).

    python tools/error_table.py            # print the table
    python tools/error_table.py --write    # replace the table in tools/ERRORS.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a clone, onnxlip not installed

from badinputs import Case, make_cases  # noqa: E402

from onnxlip.cli import main as cli_main  # noqa: E402

ERRORS_MD = ROOT / "tools" / "ERRORS.md"
BEGIN, END = "<!-- error-table:begin -->", "<!-- error-table:end -->"


def run_case(case: Case) -> tuple[int, str]:
    """Exit code and stderr of `onnxlip ARGS` (run in the cases' folder)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main(case.argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def table() -> str:
    """The Markdown table, one row per case."""
    rows = ["| case | command | exit | message (stderr) |", "| --- | --- | --- | --- |"]
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxlip-errors-") as folder:
        try:
            os.chdir(folder)
            os.environ.pop("ONNXLIP_DEBUG", None)
            for case in make_cases(Path(folder)):
                code, err = run_case(case)
                lines = err.strip().splitlines()
                message = "(no error)" if code == 0 else " ".join(lines)
                command = "onnxlip " + shlex.join(case.argv)
                rows.append(f"| {case.name} | `{command}` | {code} | {_cell(message)} |")
        finally:
            os.chdir(old)
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def write(markdown: str) -> None:
    """Put the table between the markers of tools/ERRORS.md."""
    text = ERRORS_MD.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    ERRORS_MD.write_text(f"{head}{BEGIN}\n{markdown}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update tools/ERRORS.md in place")
    args = parser.parse_args(argv)
    markdown = table()
    if args.write:
        write(markdown)
        print(f"wrote {ERRORS_MD.relative_to(ROOT)}")
    else:
        print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
