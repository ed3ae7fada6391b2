"""What was built and what each stage chooses: :func:`backend_info` (also ``python -m
sap_fast.info``, as JSON, and ``sap-fast info``, as text: :func:`format_choices`).

Every choice reported here comes from running the stages' own choosers (:mod:`.dispatch`) on
representative calls (:func:`representative_calls`), as the switches and installed backends
stand: what it says is chosen is what runs for such a call.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import batched_linalg, dispatch, gram, linalg, native, nvrtc, triton, update
from .dispatch import Stage
from .geometry import conv_geometry
from .switches import switches

__all__ = ["DEVICE_TYPES", "STAGES", "backend_info", "choices", "format_choices", "representative_calls"]

DEVICE_TYPES = ("cpu", "cuda")
#: the four stages, by name
STAGES: Dict[str, Stage] = {"gram": gram.GRAM, "eigh": linalg.EIGH, "cholesky": linalg.CHOLESKY,
                            "update": update.UPDATE}
#: the stages as ``backend_info()["stages"]`` names them (the pipeline's steps)
_STEP = {"accumulate": "gram", "spectrum": "eigh", "project": "update"}


def _conv(device_type: str, stride: int, precision: str = "fp32", dtype=torch.float64):
    """A 3×3 conv over 16 channels of 32×32 maps, zero padding 1, a batch of 8 (a ``meta`` input:
    the chooser reads shapes only)."""
    x = torch.empty((8, 16, 32, 32), dtype=torch.float32, device="meta")
    geometry = conv_geometry(x, [3, 3], [stride, stride], [1, 1], [1, 1], 1, dtype)
    return gram.gram_call(x, geometry, dtype, precision, device_type=device_type)


def representative_calls(device_type: str) -> Dict[str, list]:
    """stage name → the calls :func:`backend_info` asks its chooser about on ``device_type``: a
    3×3 stride-1 and a stride-2 conv and a linear layer (fp32 inputs, float64 Gram), and the
    stride-1 conv in tf32 with a float32 Gram; float64 Gram batches with n ≤ 32 (9×9: a depthwise
    3×3 conv) and n > 32 (576×576), for the eigendecomposition and the solve; an update with a
    full and with a thin basis."""
    linear = gram.gram_call(torch.empty((64, 512), dtype=torch.float32, device="meta"), None, torch.float64,
                            device_type=device_type)
    return {
        "gram": [_conv(device_type, 1), _conv(device_type, 2), linear,
                 _conv(device_type, 1, "tf32", torch.float32)],
        "eigh": [linalg.eigh_call(None, device_type, 9, torch.float64),
                 linalg.eigh_call(None, device_type, 576, torch.float64)],
        "cholesky": [linalg.cholesky_call(None, device_type, 9, torch.float64),
                     linalg.cholesky_call(None, device_type, 576, torch.float64)],
        "update": [update.UpdateCall(device_type, full=True), update.UpdateCall(device_type, full=False)],
    }


def choices() -> Dict[str, Dict[str, List[dict]]]:
    """stage → device type → one entry per representative call: ``call`` (what it is),
    ``chosen`` (the implementation's name), ``label`` (what it is) and ``skipped`` (each
    implementation before it: ``name`` and ``reasons``)."""
    out: Dict[str, Dict[str, List[dict]]] = {name: {} for name in STAGES}
    for device_type in DEVICE_TYPES:
        for name, calls in representative_calls(device_type).items():
            entries = []
            for call in calls:
                chosen, skipped = dispatch.choose(STAGES[name], call)
                entries.append({"call": call.describe(), "chosen": chosen.name, "label": chosen.label,
                                "skipped": [{"name": n, "reasons": r} for n, r in skipped]})
            out[name][device_type] = entries
    return out


def _summary(entries: List[dict]) -> str:
    """One line: each chosen label and the calls it serves, in the order of the calls."""
    groups: Dict[str, List[str]] = {}
    for entry in entries:
        groups.setdefault(entry["label"], []).append(entry["call"].split(" ", 1)[1])
    return "; ".join(f"{label} for {' / '.join(calls)}" for label, calls in groups.items())


def backend_info() -> dict:
    """What was built and what each stage chooses, per device type.

    Returns a dict: ``native`` (built, cuda, torch it was built against, or why not loaded),
    ``triton`` / ``triton_gram`` (available or why not; ``compile_failure``: why the kernel stopped
    being used in this process, or None), ``cupy`` (the NVRTC Gram kernel and the batched
    cuSOLVER calls: available or why not, and whether each stage's chooser picks them),
    ``forced_portable``, ``switches`` (every environment switch of the backends and its value),
    ``choosers`` (:func:`choices`: stage → device → each representative
    call's ``chosen`` implementation and the ``skipped`` ones with their reasons) and ``stages``
    (accumulate / spectrum / project → device → one line saying what the chooser picks).
    """
    module, why = native.load()
    built = dict(module.build_info()) if module is not None else {}
    update_module, update_why = triton.load("update")
    gram_module, gram_why = triton.load("gram")
    chosen = choices()
    return {
        "native": {"loaded": module is not None, "reason": why, **built},
        "triton": {"loaded": update_module is not None, "reason": update_why,
                   "compile_failure": triton.broken("update")},
        "triton_gram": {"loaded": gram_module is not None, "reason": gram_why,
                        "compile_failure": triton.broken("gram")},
        "cupy": _cupy_info(chosen),
        "forced_portable": native.forced_portable(),
        "switches": switches(),
        "choosers": chosen,
        "stages": {step: {device: _summary(chosen[stage][device]) for device in DEVICE_TYPES}
                   for step, stage in _STEP.items()},
    }


def _skip_reasons(entry: dict, name: str) -> List[str]:
    return next((s["reasons"] for s in entry["skipped"] if s["name"] == name), [])


def _cupy_info(chosen: dict) -> dict:
    """The cupy backend: whether each part can run here (or why not), and whether the stage's
    chooser picks it for its first representative CUDA call (``used``, with why in ``uses``)."""
    cp, gram_why = nvrtc.load()
    lib, linalg_why = batched_linalg.load()

    def part(stage: str, step: str, impl: str, used_for: str, **extra) -> dict:
        entry = chosen[stage]["cuda"][0]
        used = entry["chosen"] == impl
        if used:
            uses = f"{step}: {used_for}"
        else:
            reasons = _skip_reasons(entry, impl) or [f"{entry['chosen']} serves it first"]
            uses = "not used: " + "; ".join(reasons)
        return {"stage": step, **extra, "used": used, "uses": uses}

    return {
        "gram": part("gram", "accumulate", "cupy", "convs on a GPU (fp32 inputs), the CUDA Gram kernel "
                     "compiled by NVRTC", loaded=cp is not None, reason=gram_why, nvrtc=nvrtc.nvrtc_version()),
        "cusolver": {"loaded": lib is not None, "reason": linalg_why},
        "eigh": part("eigh", "spectrum", "cupy-syevj", "CUDA Gram batches with n ≤ 32, cuSOLVER "
                     "syevjBatched through cupy (SAP_FAST_BATCHED_EIGH=cupy)",
                     choice=batched_linalg.eigh_choice()),
        "cholesky": part("cholesky", "solve", "cupy-potrf", "CUDA batches of the Cholesky route "
                         "(solver='cholesky'), cuSOLVER potrfBatched through cupy "
                         "(SAP_FAST_BATCHED_CHOLESKY=cupy)", choice=batched_linalg.cholesky_choice()),
    }


def format_choices(info: dict) -> str:
    """``sap-fast info``: the build, then each stage's choice per device type and representative
    call, with every skipped implementation and its reasons."""
    lines: List[str] = []
    nat = info["native"]
    lines.append("native extension: " + (f"built (cuda: {nat.get('cuda')}, torch {nat.get('torch')})"
                                         if nat["loaded"] else f"not loaded: {nat['reason']}"))
    for key, what in (("triton", "Triton update kernel"), ("triton_gram", "Triton Gram kernel")):
        t = info[key]
        lines.append(f"{what}: " + ("available" if t["loaded"] else f"unavailable: {t['reason']}")
                     + (f" (compile failure: {t['compile_failure']})" if t["compile_failure"] else ""))
    cupy = info["cupy"]["gram"]
    lines.append("cupy: " + ("available" if cupy["loaded"] else f"unavailable: {cupy['reason']}"))
    lines.append("switches: " + " ".join(f"{k}={v}" for k, v in info["switches"].items()))
    if info["forced_portable"]:
        lines.append("SAP_FAST_BACKEND=portable: every stage on its plain-torch implementation")
    for stage, by_device in info["choosers"].items():
        lines.append("")
        lines.append(f"stage {stage}:")
        for device, entries in by_device.items():
            for entry in entries:
                lines.append(f"  {entry['call']}: {entry['chosen']} ({entry['label']})")
                for skipped in entry["skipped"]:
                    lines.append(f"    skipped {skipped['name']}: {'; '.join(skipped['reasons'])}")
    return "\n".join(lines)

