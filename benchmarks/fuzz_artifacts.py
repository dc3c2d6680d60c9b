"""Fuzz the artifact loader with 5,000 seeded examples, count the bad-input corpus and check determinism.

Prints the outcome counts and rewrites the generated sections of benchmarks/results/reliability.md
(between its `<!-- generated:NAME -->` markers; the hand-written sections stay as they are).

    .venv/bin/python benchmarks/fuzz_artifacts.py                 # 5,000 examples, seed 20241204
    .venv/bin/python benchmarks/fuzz_artifacts.py --examples 500 --no-write
    mkdir -p /tmp/before && git archive 9e91e42 fxpress | tar -x -C /tmp/before   # an older fxpress
    .venv/bin/python benchmarks/fuzz_artifacts.py --against /tmp/before --examples 1000 --seed 7
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("FXPRESS_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fuzzer and the corpus live with the tests that run them

RESULTS = ROOT / "benchmarks" / "results" / "reliability.md"
TEST_EXAMPLES = 200  # what tests/test_artifact_fuzz.py runs (derandomized)


def run_fuzz(examples: int, seed: int | None) -> tuple[Any, float]:
    """Build the two artifacts and fuzz them; return (tally, seconds spent fuzzing)."""
    from artifact_fuzz import build_artifacts, fuzz, references

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = build_artifacts(Path(tmp))
        refs = references(artifacts)
        start = time.perf_counter()
        tally = fuzz(artifacts, refs, examples, seed=seed, stop_on_failure=False)
        return tally, time.perf_counter() - start


def print_tally(label: str, tally: Any) -> None:
    print(f"{label}: loads {dict(tally.loads)}; inspect {dict(tally.inspects)}; unacceptable {tally.failure_count}")
    for failure in tally.failures:
        print("  FAIL", failure)


def table(counter: Counter, what: str) -> str:
    rows = [f"| {key} | {count:,} |" for key, count in counter.most_common()]
    return "\n".join([f"| {what} | examples |", "|---|---:|", *rows, f"| **total** | **{sum(counter.values()):,}** |"])


def fuzz_section(tally: Any, examples: int, how: str, seconds: float) -> str:
    failures = f"{tally.failure_count}" + "".join(f"\n- {f}" for f in tally.failures)
    changed = "\n".join(f"- {c}" for c in tally.changed[:5]) or "none"
    return (f"{examples:,} examples, {how}, {seconds:.0f} s on this machine.\n\n"
            f"Loading (`fxpress.load` with a factory in 3 of 4 examples, else without; pickle and torch.load "
            f"patched to raise):\n\n{table(tally.loads, 'outcome')}\n\n"
            f"`fxpress inspect` on the same folders:\n\n{table(tally.inspects, 'exit')}\n\n"
            f"Unacceptable outcomes (untyped exceptions, loaded models that do not run): {failures}\n\n"
            f"Examples of mutations that loaded with another output (a valid file of another model):\n{changed}")


def corpus_section() -> str:
    from test_bad_input_corpus import CASES

    kinds = Counter(c.kind for c in CASES)
    cli = sum(c.cli is not None for c in CASES)
    rows = [f"| {kind} | {count} |" for kind, count in sorted(kinds.items())]
    errors = Counter((c.error if isinstance(c.error, type) else c.error[0]).__name__ for c in CASES)
    return "\n".join(["| kind | cases |", "|---|---:|", *rows, f"| **total** | **{len(CASES)}** |", "",
                      f"{len(kinds)} kinds; {cli} cases also run through the command line (non-zero exit, one "
                      "line on stderr, the error re-raised with --debug). Expected error types: "
                      + ", ".join(f"{n} {c}" for n, c in errors.most_common()) + "."])


def determinism_section() -> str:
    from test_artifact_determinism import RUNS, file_hashes

    import fxpress

    rows = []
    for name, (build, inputs, settings) in sorted(RUNS.items()):
        with tempfile.TemporaryDirectory() as tmp:
            for run in ("one", "two"):
                fxpress.save(fxpress.compress(build(), inputs(), **settings), Path(tmp) / run)
            one, two = file_hashes(Path(tmp) / "one"), file_hashes(Path(tmp) / "two")
        same = "identical" if one == two else "DIFFERENT: " + ", ".join(k for k in one if one[k] != two.get(k))
        rows.append(f"| {name} | {len(one)} | {same} | `{one.get('manifest.json', '')[:16]}` |")
    return "\n".join(["| recipe | files | sha256 of two runs | manifest sha256 (first 16) |", "|---|---:|---|---|",
                      *rows])


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{RESULTS} lacks the markers of section {name!r}")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=20241204)
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} as it is")
    parser.add_argument("--against", type=Path, default=None, metavar="DIR",
                        help="fuzz the fxpress package in DIR instead (counts printed, nothing written)")
    args = parser.parse_args()
    if args.against is not None:
        sys.path.insert(0, str(args.against.resolve()))
        import fxpress

        print(f"fuzzing {Path(fxpress.__file__).parent}")
        print_tally(f"seed {args.seed}", run_fuzz(args.examples, args.seed)[0])
        return
    in_test, test_seconds = run_fuzz(TEST_EXAMPLES, None)
    seeded, seconds = run_fuzz(args.examples, args.seed)
    print_tally("test (derandomized)", in_test)
    print_tally(f"benchmark (seed {args.seed})", seeded)
    sections = {
        "corpus": corpus_section(),
        "fuzz-test": fuzz_section(in_test, TEST_EXAMPLES, "derandomized as in `make test`", test_seconds),
        "fuzz-benchmark": fuzz_section(seeded, args.examples, f"hypothesis seed {args.seed}", seconds),
        "determinism": determinism_section(),
    }
    print(sections["corpus"], sections["determinism"], sep="\n\n")
    if not args.no_write:
        text = RESULTS.read_text()
        for name, body in sections.items():
            text = replace_section(text, name, body)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
