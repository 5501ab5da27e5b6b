"""A checkout of another commit for same-run A/B benchmarks (`--compare-ref GITREF`): a detached git worktree,
removed when the benchmark exits."""

from __future__ import annotations

import atexit
import subprocess


def worktree(repo: str, ref: str, folder: str) -> str:
    """Check `ref` of `repo` out into `folder` (new); returns `folder`."""
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", folder, ref], check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", repo, "worktree", "remove", "--force", folder], capture_output=True)
    return folder
