"""Run diffusers' own DDPM/DDIM scheduler tests against diffkernels' schedulers.

    python tests/peer/run_diffusers_scheduler_tests.py PATH [--ref v0.40.0] [--theirs] [-- PYTEST_ARGS]

PATH is a diffusers checkout (a work tree) or a diffusers git dir (bare or .git); with a git
dir the files are read at --ref (default: the newest v* tag, at least v0.40.0). The files
tests/schedulers/{test_scheduler_ddpm,test_scheduler_ddim,test_schedulers}.py, and the helpers
they import (tests/testing_utils.py, tests/others/test_utils.py), are copied to a temporary
folder; in the two test files the one line that picks the class
(`from diffusers import DDPMScheduler` / `DDIMScheduler`) becomes an import from
diffkernels.schedulers (--theirs keeps diffusers' classes: the control run). Then pytest runs
them (by default only the DDPMSchedulerTest / DDIMSchedulerTest classes: the base
classes that their modules import test diffusers' own objects). Nothing fetched is written into this repository. Exit status: pytest's; 0 with a message
("SKIP: ...") when PATH is missing or holds no diffusers tests.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ["tests/schedulers/test_scheduler_ddpm.py", "tests/schedulers/test_scheduler_ddim.py",
         "tests/schedulers/test_schedulers.py", "tests/testing_utils.py",
         "tests/others/test_utils.py"]
SWAPS = {"tests/schedulers/test_scheduler_ddpm.py": "DDPMScheduler",
         "tests/schedulers/test_scheduler_ddim.py": "DDIMScheduler"}
MIN_TAG = (0, 40, 0)


def _git(git_dir, *args):
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True,
                          capture_output=True, text=True).stdout


def _newest_tag(git_dir):
    tags = []
    for tag in _git(git_dir, "tag", "--list", "v*").split():
        m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
        if m:
            tags.append((tuple(int(x) for x in m.groups()), tag))
    tags = [t for t in tags if t[0] >= MIN_TAG]
    return max(tags)[1] if tags else "HEAD"


def read_sources(path, ref=None):
    """{relative path: text} of FILES, and a label saying where they came from; None when
    `path` holds no diffusers scheduler tests."""
    work_tree = os.path.join(path, FILES[0])
    if os.path.isfile(work_tree) and ref is None:
        texts = {}
        for f in FILES:
            with open(os.path.join(path, f), encoding="utf-8") as fh:
                texts[f] = fh.read()
        return texts, f"work tree {path}"
    git_dir = path
    if os.path.isdir(os.path.join(path, ".git")):
        git_dir = os.path.join(path, ".git")
    try:
        ref = ref or _newest_tag(git_dir)
        return {f: _git(git_dir, "show", f"{ref}:{f}") for f in FILES}, f"{git_dir} at {ref}"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None, None


def swap_import(text, cls):
    line = f"from diffusers import {cls}\n"
    if text.count(line) != 1:
        raise SystemExit(f"error: expected exactly one line {line.strip()!r} to swap")
    return text.replace(line, f"from diffkernels.schedulers import {cls}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=os.environ.get("DIFFUSERS_SRC"),
                   help="diffusers checkout or git dir (default: $DIFFUSERS_SRC)")
    p.add_argument("--ref", help="git ref to read the tests at (default: newest v* tag)")
    p.add_argument("--theirs", action="store_true", help="keep diffusers' classes (control)")
    args, pytest_args = p.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]
    if not any(a == "-k" or a.startswith("-k") for a in pytest_args):
        # the two suites only (their modules also import diffusers' base tests, which test
        # diffusers' own objects)
        pytest_args += ["-k", "DDPMSchedulerTest or DDIMSchedulerTest"]
    if not args.path or not os.path.exists(args.path):
        print(f"SKIP: no diffusers checkout (got {args.path!r}); pass a path or set "
              f"DIFFUSERS_SRC to a diffusers work tree or git dir")
        return 0
    texts, where = read_sources(args.path, args.ref)
    if texts is None:
        print(f"SKIP: {args.path} holds no diffusers tests/schedulers files")
        return 0
    with tempfile.TemporaryDirectory(prefix="diffusers-peer-") as tmp:
        for rel, text in texts.items():
            if rel in SWAPS and not args.theirs:
                text = swap_import(text, SWAPS[rel])
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w", encoding="utf-8") as fh:
                fh.write(text)
        for pkg in ("tests", "tests/schedulers", "tests/others"):
            open(os.path.join(tmp, pkg, "__init__.py"), "a").close()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [REPO, tmp] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
        which = "diffusers' classes" if args.theirs else "diffkernels.schedulers"
        print(f"diffusers scheduler tests from {where}, classes: {which}", flush=True)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", tmp,
               "-o", "addopts=", os.path.join(tmp, FILES[0]),
               os.path.join(tmp, FILES[1]), *pytest_args]
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
