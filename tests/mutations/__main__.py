"""``python -m tests.mutations [NAME ...] [--short] [--list] [--no-baseline] [--every-test]``.

Exit status: 0 if the baseline passes and every mutation is caught, 1 otherwise, 2 if a
mutation is stale (its old snippet is no longer in the code) or unknown.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import MUTATIONS, SHORT, StaleMutationError, by_name, check_fresh, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--short", action="store_true", help="only the short list CI runs")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the tests on the unmutated copy first")
    parser.add_argument("--every-test", action="store_true",
                        help="run every named test under each mutation (default: stop at the "
                             "first failure)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each mutation's pytest output tail")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    try:
        chosen = by_name(args.names) if args.names else by_name(SHORT) if args.short else MUTATIONS
        check_fresh(chosen)
    except (KeyError, StaleMutationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.file:28s} {' '.join(m.tests)}")
        return 0
    start = time.perf_counter()
    outcomes = run(chosen, baseline=not args.no_baseline, timeout=args.timeout, echo=True,
                   every_test=args.every_test)
    results = [o for o in outcomes if not o.name.startswith("(baseline)")]
    bad = [o for o in outcomes if o.verdict not in ("caught", "passes")]
    for o in outcomes if args.verbose else bad:
        print(f"\n--- {o.verdict}: {o.name} (output tail) ---\n{o.tail}", file=sys.stderr)
    caught = sum(o.verdict == "caught" for o in results)
    print(f"\n{caught} of {len(chosen)} mutations caught in {time.perf_counter() - start:.0f} s"
          + ("" if len(results) == len(chosen) else " (stopped: the baseline fails)"))
    return 0 if not bad and len(results) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
