"""Run many ``fxfuse`` command lines, each in its own process, cheaply: this driver imports torch
and fxfuse once, then forks one child per command line (the child changes into the case's folder,
sends its stdout/stderr to files and calls ``fxfuse.cli.main``; an exception that escapes prints
its traceback to stderr and exits 1, as the ``fxfuse`` script would).

``python tests/cli_runner.py < cases.json > results.json``: cases are ``{"argv": [...],
"cwd": "..."}``, results ``{"rc": int, "stdout": str, "stderr": str}`` in the same order.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def run_case(argv: list[str], cwd: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        pid = os.fork()
        if pid == 0:  # the child: one fxfuse process
            rc = 1
            try:
                os.chdir(cwd)
                out = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
                err = os.open(err_path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.dup2(out, 1)
                os.dup2(err, 2)
                sys.stdout = os.fdopen(1, "w", closefd=False)
                sys.stderr = os.fdopen(2, "w", closefd=False)
                from fxfuse.cli import main

                try:
                    rc = int(main(argv) or 0)
                except SystemExit as exc:
                    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        with open(out_path) as f_out, open(err_path) as f_err:
            return {"rc": os.waitstatus_to_exitcode(status), "stdout": f_out.read(),
                    "stderr": f_err.read()}


def main() -> None:
    import torch  # noqa: F401  (imported once, before forking)

    import fxfuse.cli  # noqa: F401

    cases = json.load(sys.stdin)
    results = [run_case(c["argv"], c["cwd"]) for c in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
