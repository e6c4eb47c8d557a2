"""A small git history of KVM ``nested.c`` changes, one of which removes the GIF fix.

It proves the `git bisect run` path end to end: each step is built with
``kvmtest kmod build --source <repo>`` (an incremental rebuild, since all
steps share one work dir and differ only in ``nested.c``), booted and judged.
The repository holds only what the out-of-tree build reads: the top
Makefile (for the version check), ``arch/x86/kvm`` and ``virt/kvm``.

History (index in the returned list):
  0  import of the stock tree                     good
  1  comment before nested_svm_inject_npf_exit()  good
  2  comment before nested_svm_vmrun()            good
  3  removes svm_set_gif(svm, false) (the fix)    BAD  <- bisect must name this
  4  comment before nested_svm_vmexit()           bad
  5  comment at the end of the file               bad

The recipe is in docs/kmod.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from kvmtest.kmod import NESTED_C, KmodError, check_source_dir, source_files

BAD_INDEX = 3  # index of the first bad commit in make_nested_c_history()'s result

# The fix (f85a6ce06e4a) is the svm_set_gif(svm, false) in the early
# consistency-check failure block of nested_svm_vmrun(), between the
# SVM_EXIT_ERR write and `goto out;`.  [^}] keeps the match inside that block.
_GIF_FIX = re.compile(
    r"(vmcb12->control\.exit_code\s*=\s*SVM_EXIT_ERR;[^}]*?)"
    r"\n[ \t]*svm_set_gif\(svm, false\);[ \t]*(?=\n[^}]*?goto out;)")

# Fixed dates and identity: the same source tree always gives the same shas.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "kvmtest fixture", "GIT_AUTHOR_EMAIL": "kvmtest@localhost",
    "GIT_COMMITTER_NAME": "kvmtest fixture", "GIT_COMMITTER_EMAIL": "kvmtest@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def has_gif_fix(nested_c: str) -> bool:
    """True if nested_svm_vmrun() clears GIF on an early consistency-check failure."""
    return _GIF_FIX.search(nested_c) is not None


def remove_gif_fix(nested_c: str) -> str:
    """nested.c text with the GIF fix removed (raise if it is not there exactly once)."""
    text, count = _GIF_FIX.subn(r"\1", nested_c)
    if count != 1:
        raise KmodError(f"GIF fix found {count} times in {NESTED_C} (expected 1): "
                        "this source predates f85a6ce06e4a or has a different layout")
    return text


def _insert_comment_before(anchor: str, comment: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        if text.count(anchor) != 1:
            raise KmodError(f"anchor {anchor!r} not found once in {NESTED_C}")
        return text.replace(anchor, f"/* {comment} */\n{anchor}")
    return edit


def _append_comment(comment: str) -> Callable[[str], str]:
    return lambda text: text.rstrip("\n") + f"\n\n/* {comment} */\n"


# (commit subject, edit of nested.c) for commits 1..5; anchors exist in 5.10..6.18.
_STEPS: list[tuple[str, Callable[[str], str]]] = [
    ("KVM: nSVM: fixture: comment nested_svm_inject_npf_exit()",
     _insert_comment_before("static void nested_svm_inject_npf_exit(",
                            "kvmtest fixture: harmless change 1")),
    ("KVM: nSVM: fixture: comment nested_svm_vmrun()",
     _insert_comment_before("int nested_svm_vmrun(struct kvm_vcpu *vcpu)\n",
                            "kvmtest fixture: harmless change 2")),
    ("KVM: nSVM: fixture: drop svm_set_gif(svm, false) on early VMRUN failure (BAD)",
     remove_gif_fix),
    ("KVM: nSVM: fixture: comment nested_svm_vmexit()",
     _insert_comment_before("int nested_svm_vmexit(struct vcpu_svm *svm)\n",
                            "kvmtest fixture: harmless change 3")),
    ("KVM: nSVM: fixture: trailing comment",
     _append_comment("kvmtest fixture: harmless change 4")),
]


def _git(repo: Path, *args: str, date: int = 0) -> str:
    stamp = f"{1_700_000_000 + 3600 * date} +0000"
    env = {**os.environ, **_GIT_ENV, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
    proc = subprocess.run(["git", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null",
                           *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KmodError(f"git {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip()


def _copy_tree(source_tree: Path, dest: Path) -> None:
    """Copy what the module build reads (no build products, no .git)."""
    files = dict(source_files(source_tree))
    if (source_tree / "Makefile").is_file():
        files["Makefile"] = source_tree / "Makefile"
    for rel, path in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)


def _commit(repo: Path, message: str, index: int) -> str:
    _git(repo, "add", "-A", date=index)
    _git(repo, "commit", "-q", "-m", message, date=index)
    return _git(repo, "rev-parse", "HEAD")


def make_nested_c_history(source_tree: Path, dest: Path) -> list[str]:
    """Create a git repo at dest (new or empty dir) with the history above; return shas.

    source_tree must contain the GIF fix (e.g. Debian linux-source-6.1
    6.1.192; see kmod.resolve_source).  shas[0] is good, shas[BAD_INDEX] is
    the first bad commit, shas[-1] is HEAD (bad).
    """
    source_tree = check_source_dir(Path(source_tree).resolve())
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise KmodError(f"{dest} exists and is not empty")
    if not has_gif_fix((source_tree / NESTED_C).read_text()):
        raise KmodError(f"{source_tree / NESTED_C} lacks the GIF fix: nothing to bisect")
    dest.mkdir(parents=True, exist_ok=True)
    _git(dest, "init", "-q", "-b", "main")
    _copy_tree(source_tree, dest)
    shas = [_commit(dest, "Import arch/x86/kvm and virt/kvm (stock, GIF fix present)", 0)]
    nested = dest / NESTED_C
    for index, (subject, edit) in enumerate(_STEPS, start=1):
        nested.write_text(edit(nested.read_text()))
        shas.append(_commit(dest, subject, index))
    return shas


def gif_clear_refs(kvm_amd_ko: Path) -> int:
    """How often nested_svm_vmrun() in a built kvm-amd.ko references svm_set_gif.

    A QEMU-free, build-level signal for tests of the bisect plumbing: removing
    the fix drops exactly one reference (8 -> 7 on 6.1.192 with Debian's gcc-12).
    It is not a verdict on behaviour; `kvmtest bisect-run` boots and judges.
    """
    cmd = ["objdump", "-dr", "--no-show-raw-insn", "--disassemble=nested_svm_vmrun",
           str(kvm_amd_ko)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KmodError(f"objdump failed on {kvm_amd_ko}: {proc.stderr.strip()[:200]}")
    return sum("svm_set_gif" in line for line in proc.stdout.splitlines())
