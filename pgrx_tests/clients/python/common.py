"""Shared by the Python client programs run by pgrx_tests/tests/clients.rs.

The connection comes from libpq's environment (PGHOST = the cluster's socket
directory, PGPORT, PGUSER, PGDATABASE), set by the test. Checks print what
they checked, never a value: test data is personal data in spirit.
"""

import os
import sys

_passed = 0


def check(cond, what):
    """Counts a passed check; exits non-zero naming the failed one."""
    global _passed
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    _passed += 1
    print(f"ok: {what}", flush=True)


def sqlstate_of(fn):
    """The SQLSTATE fn() fails with, or 'ok'."""
    try:
        fn()
    except Exception as e:  # driver-specific error classes
        code = getattr(e, "sqlstate", None) or getattr(getattr(e, "orig", None), "sqlstate", None)
        return code or type(e).__name__
    return "ok"


def done(program):
    print(f"{program}: all {_passed} checks ok", flush=True)


def styles(default=("explicit",)):
    """The styles named on the command line (explicit, view)."""
    return sys.argv[1:] or list(default)


def env(name):
    v = os.environ.get(name)
    if not v:
        print(f"FAILED: {name} is not set (run by pgrx_tests/tests/clients.rs)")
        sys.exit(2)
    return v
