#!/usr/bin/env python3
"""Counts the test cases that skipped in one `bazel test` run.

Usage: tools/count_skipped.py TESTLOGS_DIR BAZEL_OUTPUT_LOG

Reads the test targets from the summary lines of BAZEL_OUTPUT_LOG
("//pkg:name  PASSED in 0.1s") and, for each, its TESTLOGS_DIR/pkg/name:
test.xml (GoogleTest cases with <skipped>) or, for Python unittest
targets, the "skipped=N" of test.log. Prints the total on stdout and one
line per target with skips on stderr ("  //pkg:name: 18 of 20 cases
skipped"). A target that ran no case counts nothing.
"""
import os
import re
import sys
import xml.etree.ElementTree as ET

SUMMARY = re.compile(r"^(//[^ ]+) +(?:\(cached\) )?(PASSED|FAILED|FLAKY|TIMEOUT)")
UNITTEST = re.compile(r"\((?:[a-z]+=\d+, )*skipped=(\d+)")
UNITTEST_RAN = re.compile(r"^Ran \d+ tests? in ", re.M)


def count_xml(path):
    """(skipped, cases) in a GoogleTest XML report, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    skipped = cases = 0
    for case in root.iter("testcase"):
        cases += 1
        if case.get("result") == "skipped" or case.find("skipped") is not None:
            skipped += 1
    return (skipped, cases) if cases else None


def count_unittest(path):
    """(skipped, None) from a Python unittest log, or None."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    if not UNITTEST_RAN.search(text):
        return None
    found = UNITTEST.findall(text)
    return (int(found[-1]), None) if found else (0, None)


def main():
    testlogs, log = sys.argv[1], sys.argv[2]
    targets = []
    with open(log, errors="replace") as f:
        for line in f:
            m = SUMMARY.match(line)
            if m:
                targets.append(m.group(1))
    total = 0
    for target in targets:
        rel = target[2:].replace(":", "/")
        # A Python unittest target's test.xml is Bazel's own (one case
        # for the whole run): its log says what skipped.
        got = count_unittest(os.path.join(testlogs, rel, "test.log"))
        if got is None:
            got = count_xml(os.path.join(testlogs, rel, "test.xml"))
        if not got or not got[0]:
            continue
        skipped, cases = got
        total += skipped
        of = f" of {cases}" if cases else ""
        print(f"  {target}: {skipped}{of} cases skipped", file=sys.stderr)
    print(total)


if __name__ == "__main__":
    main()
