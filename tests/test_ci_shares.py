"""CI's three environments together run every test (tests/conftest.py's SHARES and
EVERY_ENVIRONMENT): a file in no share would never run in CI."""

import pathlib
import subprocess
import sys

import conftest

TESTS = pathlib.Path(__file__).resolve().parent


def test_every_test_file_is_in_one_share_or_runs_in_every_environment():
  files = sorted(path.name for path in TESTS.glob("test_*.py"))
  whole = {entry for entry in conftest.EVERY_ENVIRONMENT if "::" not in entry}
  shared = [name for share in conftest.SHARES.values() for name in share]
  assert sorted(shared) == sorted(set(shared)), "a file is in two shares"
  assert not whole & set(shared), "a file runs in every environment and in a share"
  assert sorted(set(shared) | whole) == files


def test_each_entry_names_a_test_and_the_shares_cover_the_suite():
  everything = [line for line in subprocess.run(
      [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
      cwd=TESTS.parent, capture_output=True, text=True, check=True).stdout.splitlines()
      if "::" in line]
  assert len(everything) > 500
  assert all(any(conftest.runs_in(share, test) for share in conftest.SHARES)
             for test in everything)
  for entry in conftest.EVERY_ENVIRONMENT:
    named = [test for test in everything if conftest.names(entry, test.removeprefix("tests/"))]
    assert named, f"{entry} names no test"
    assert all(conftest.runs_in(share, test) for share in conftest.SHARES for test in named)
