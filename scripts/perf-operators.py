#!/usr/bin/env python3
"""Shares of a `perf record --call-graph dwarf` profile of persona, by dataflow operator.

Each sample is counted under the operator whose closure is on its stack (the innermost frame
of persona's views or differential's operators inside timely's operator builder); samples
outside any operator are counted under the innermost `persona::` frame (reading, parsing,
interning, rendering the dump).

    perf record -F 199 --call-graph dwarf,16384 -o perf.data target/release/persona replay ...
    perf script -i perf.data -F comm,ip,sym --inline > stacks.txt   # slow: minutes
    scripts/perf-operators.py stacks.txt
"""
import collections
import re
import sys

OPERATOR = re.compile(
    r"persona_dataflows::\w+::\w+"
    r"|differential_dataflow::operators::\w+::\w+"
    r"|timely::dataflow::operators::[\w:]+"
)


def attribute(frames):
    """frames: leaf first."""
    outer = None
    for i, f in enumerate(frames):
        if "builder_rc::OperatorBuilder" in f and "build" in f:
            outer = i
    if outer is None:
        for f in frames:
            m = re.search(r"persona::\w+::\w+", f)
            if m and not re.search(r"persona::engine::(start|run_worker)", f):
                return "outside operators: " + m.group(0)
        return "outside operators: worker loop (timely scheduling, progress, channels)"
    for f in reversed(frames[:outer]):
        m = OPERATOR.search(f)
        if m and not re.search(r"generic::(builder|operator)|handles", f):
            return m.group(0)
    return "operators: timely (unattributed)"


def main(path):
    counts = collections.Counter()
    frames = []
    total = 0

    def flush():
        nonlocal total, frames
        if frames:
            counts[attribute(frames)] += 1
            total += 1
        frames = []

    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                flush()
            elif line.startswith("\t"):
                parts = line.strip().split(" ", 1)
                if len(parts) == 2:
                    frames.append(parts[1])
    flush()
    for name, n in counts.most_common(25):
        print(f"{100 * n / total:5.1f} %  {name}")
    print(f"{total} samples")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
