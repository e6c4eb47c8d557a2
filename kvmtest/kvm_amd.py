"""kvm_amd's module parameters as the running module reports them, and the
case capabilities they decide.

/sys/module/kvm_amd/parameters holds the *effective* values: kvm_amd clears
npt, vgif, vls ... at load when the CPU lacks the feature (svm.c
svm_hardware_setup), so these say which paths a failed VMRUN takes here.
"""

from __future__ import annotations

from pathlib import Path

from .case import NEED_NO_NPT, NEED_NO_VGIF, NEED_NO_VLS, NEED_NPT, NEED_VGIF, NEED_VLS

PARAMS_DIR = Path("/sys/module/kvm_amd/parameters")
# The values a kernel reports for a parameter that is on ("Y" for bool,
# "1" for int parameters such as vgif or nested).
ON = ("Y", "y", "1")
# What kvm_amd gives L1 when nothing is forced: npt on, vGIF only where the
# CPU model has it (TCG's default EPYC does not).
MODEL_DEFAULTS = {"nested": "1", "npt": "Y", "vgif": "0", "nrips": "0", "vls": "0"}


def module_params(base: Path = PARAMS_DIR) -> dict[str, str]:
    """name -> value of every readable kvm_amd parameter ({} without kvm_amd)."""
    out: dict[str, str] = {}
    if base.is_dir():
        for p in sorted(base.iterdir()):
            try:
                out[p.name] = p.read_text().strip()
            except OSError:
                continue
    return out


def is_on(params: dict[str, str], name: str) -> bool | None:
    """True/False for a parameter the module reports, None if it has none."""
    value = params.get(name)
    return None if value is None else value in ON


def config_capabilities(params: dict[str, str]) -> dict[str, str | None]:
    """need -> None if this configuration provides it, else why not and how to get it."""
    npt, vgif, vls = is_on(params, "npt"), is_on(params, "vgif"), is_on(params, "vls")
    where = "kvm_amd" if params else "no kvm_amd module"
    return {
        NEED_NPT: None if npt else (
            f"{where}: npt={params.get('npt', '?')}, L1 has no nested paging "
            "(run with npt=1, kvm_amd's default, on a CPU with NPT)"),
        NEED_NO_NPT: None if npt is False else (
            f"{where}: npt={params.get('npt', '?')}: this case is about shadow paging "
            "(run with --kvm-amd-param npt=0)"),
        NEED_VGIF: None if vgif else (
            f"{where}: vgif={params.get('vgif', '?')}: no virtual GIF "
            "(run with --cpu EPYC,+vgif under QEMU, or on a CPU with vGIF)"),
        # No kvm_amd (another vendor's KVM) means no virtual GIF either.
        NEED_NO_VGIF: None if not vgif else (
            f"{where}: vgif={params.get('vgif', '?')}: this case needs STGI/CLGI "
            "intercepted (run with --kvm-amd-param vgif=0)"),
        NEED_VLS: None if vls else (
            f"{where}: vls={params.get('vls', '?')}: no virtual VMLOAD/VMSAVE (needs npt=1 and "
            "a CPU with V_VMSAVE_VMLOAD: AMD hardware or QEMU -enable-kvm; QEMU 7.2's TCG "
            "has none)"),
        NEED_NO_VLS: None if not vls else (
            f"{where}: vls={params.get('vls', '?')}: this case needs VMLOAD/VMSAVE "
            "intercepted (run with --kvm-amd-param vls=0)"),
    }
