"""Compile every Triton kernel configuration sap_fast can launch, for a GPU that is not here.

Triton compiles ahead of time for a named target without a GPU or a driver. This check builds
each launch exactly as the launchers do (``conv_gram_launches`` and ``scaled_update_launches``
on ``meta`` tensors shaped like real layers), specialises its arguments with the kernel's own
binder (so ints equal to 1 become constants and aligned pointers get their hints, as at a real
launch), compiles it for the target (default sm_90, the H100/H200) and reads the machine code:

- registers, spill stores/loads (ptxas), shared memory, local memory;
- the matrix instructions in the SASS: DMMA (FP64 tensor cores), HMMA/HGMMA (TF32/BF16
  tensor cores), DFMA/FFMA (plain FMAs).

What it covers: the Gram kernel in every precision mode with its default launch for each tile
width the defaults choose (16, 32, 64), with and without split-K atomics, with each padding
check (1-D/2-D/3-D, grouped), and every tuning candidate of ``configs()``; the mirror pass; the
update kernel in fp32 and fp64, full and thin basis, every autotune config and the default.

It fails (exit 1) on any compile error, and on a spill in a default configuration (one that
runs without the user asking for tiles); spills elsewhere are reported. One line per launch:

    OK    gram fp64 conv3x3 default  d64 k16 w4 s2  regs 236  spill 0/0  smem 1024  DMMA 8   1.2 s

    python tools/check_triton.py                 # the installed Triton
    python tools/check_triton.py --triton 3.6.0  # that release, installed once into build/triton-3.6.0
    python tools/check_triton.py --json out.jsonl --jobs 2 --arch 90

With ``--triton`` the release is installed with ``pip install --no-deps --target`` beside the
test stack (never over it) and the check runs again with it first on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_SMS = 132  # sizes the split-K as on an H100 (atomics on or off)


class Variant(NamedTuple):
    """One launch to compile: a label, whether it runs by default, and the launch record."""
    label: str
    default: bool
    launch: object  # sap_fast.backends.triton.Launch


def _meta(shape, dtype):
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


def gram_variants() -> List[Variant]:
    """Every Gram launch configuration: each mode × the geometries that select each default
    (tile width, atomics, padding checks), and each tuning candidate on a ResNet-50 3×3 conv."""
    import torch
    from sap_fast.backends.triton import gram as g

    f32 = torch.float32
    # (label, x shape, kernel, stride, padding, dilation, groups): each picks a default tile width
    # (d = C/groups · taps → block_d 16, 32 or 64), split-K atomics on or off (rows) and which
    # padding checks are compiled in (padded dims)
    geometries = [
        ("conv3x3", (8, 64, 56, 56), [3, 3], [1, 1], [1, 1], [1, 1], 1),        # d 576, atomics, pad
        ("conv1x1-s2", (8, 32, 28, 28), [1, 1], [2, 2], [0, 0], [1, 1], 1),     # d 32
        ("depthwise", (8, 96, 14, 14), [3, 3], [1, 1], [1, 1], [1, 1], 96),      # d 9, groups
        ("conv3d", (2, 4, 8, 8, 8), [3, 3, 3], [1, 1, 1], [1, 1, 1], [2, 1, 1], 1),  # d 108, 3 checks
        ("linear", (4096, 768, 1), [1], [1], [0], [1], 1),                       # rows as a 1×1 conv
        ("linear-few-rows", (64, 48, 1), [1], [1], [0], [1], 1),                 # no atomics
    ]
    out = []
    for precision in g.PRECISIONS:
        for label, shape, k, s, p, dil, groups in geometries:
            _, launches = g.conv_gram_launches(_meta(shape, f32), k, s, p, dil, groups, precision,
                                               sm_count=H100_SMS)
            for launch in launches:
                name = "mirror" if launch.kernel is g._mirror_kernel else label
                out.append(Variant(f"gram {precision} {name} default", True, launch))
        shape, k, s, p, dil = geometries[0][1:6]
        for cfg in g.configs(precision):
            _, launches = g.conv_gram_launches(_meta(shape, f32), k, s, p, dil, 1, precision,
                                               sm_count=H100_SMS, **cfg)
            out.append(Variant(f"gram {precision} conv3x3 tuning", False, launches[0]))
    return out


def update_variants() -> List[Variant]:
    """Every update launch configuration: fp32/fp64 × full/thin basis × (each autotune config,
    the default with autotuning off)."""
    import torch
    from sap_fast.backends.triton import update as u

    out = []
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        for full, r in ((True, 576), (False, 300)):
            weight, basis = _meta((1, 256, 576), dtype), _meta((1, 576, r), dtype)
            wu, eigvals = _meta((1, 256, r), dtype), _meta((1, r), dtype)
            form = "full" if full else "thin"
            _, (tuned,) = u.scaled_update_launches(weight, wu, basis, eigvals, 3e4, full=full, autotune=True)
            for cfg in tuned.kernel.configs:  # the autotuner's candidates, as it compiles them
                kwargs = dict(tuned.kwargs, **cfg.all_kwargs())
                out.append(Variant(f"update {name} {form} autotune", False,
                                   tuned._replace(kernel=tuned.kernel.fn, kwargs=kwargs)))
            _, (fixed,) = u.scaled_update_launches(weight, wu, basis, eigvals, 3e4, full=full, autotune=False)
            out.append(Variant(f"update {name} {form} default", True, fixed))
    return out


def _tiles(kwargs: dict) -> str:
    keys = [("BLOCK_D", "d"), ("BLOCK_K", "k"), ("BLOCK_M", "m"), ("BLOCK_N", "n")]
    parts = [f"{short}{kwargs[key]}" for key, short in keys if key in kwargs]
    parts += [f"w{kwargs.get('num_warps', 4)}", f"s{kwargs.get('num_stages', 3)}"]
    return " ".join(parts)


def _specialise(launch, target):
    """What ``JITFunction.run`` hands ``triton.compile`` for this launch, for ``target``: the
    kernel's own binder specialises the arguments (constants, alignment hints)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, triton


_MMA = ("DMMA", "HGMMA", "HMMA", "DFMA", "FFMA")


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one launch for ``sm_<arch>``; a record of what ptxas and the SASS say."""
    start = time.time()
    record = {"label": variant.label, "default": variant.default, "tiles": _tiles(variant.launch.kwargs)}
    try:
        from triton.backends.compiler import GPUTarget
        src, options, triton = _specialise(variant.launch, GPUTarget("cuda", arch, 32))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        ptxas = log.getvalue()
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
        regs = re.search(r"Used (\d+) registers", ptxas)
        record.update(status="OK", regs=int(regs.group(1)) if regs else None,
                      spill_stores=int(spills.group(1)) if spills else None,
                      spill_loads=int(spills.group(2)) if spills else None,
                      shared=int(kernel.metadata.shared), **_sass(kernel.asm["cubin"], triton))
    except Exception as err:  # the check's whole point: report it, do not stop
        from sap_fast.backends.triton import summary
        record.update(status="FAIL", error=summary(err, limit=600))
    record["seconds"] = round(time.time() - start, 2)
    return record


def _sass(cubin: bytes, triton) -> dict:
    """Local memory per thread and the count of each matrix instruction, from Triton's own
    cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {"local": None, "mma": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    local = re.search(r"LOCAL:(\d+)", usage)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass, re.M)
    counts = {op: sum(1 for o in ops if o == op) for op in _MMA}
    return {"local": int(local.group(1)) if local else None, "mma": {k: v for k, v in counts.items() if v}}


def _line(r: dict) -> str:
    if r["status"] != "OK":
        return f"FAIL  {r['label']:<36} {r['tiles']:<18} {r['error']}"
    spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_stores"] is not None else "?"
    mma = " ".join(f"{k} {v}" for k, v in (r["mma"] or {}).items())
    flag = "SPILL" if r["spill_stores"] else "OK"
    return (f"{flag:<5} {r['label']:<36} {r['tiles']:<18} regs {r['regs']!s:>3}  spill {spill:<7} "
            f"smem {r['shared']:>6}  {mma:<20} {r['seconds']:5.1f} s")


def _worker_init() -> None:
    sys.path.insert(0, ROOT)


def _variants() -> List[Variant]:
    return gram_variants() + update_variants()


def _compile_by_index(args: Tuple[int, int]) -> dict:
    index, arch = args
    return compile_variant(_variants()[index], arch)


def check(arch: int, jobs: int) -> List[dict]:
    """Compile every distinct launch (in ``jobs`` processes): launches that specialise to the
    same compiled kernel (the mirror pass after every Gram, a tuning candidate equal to the
    default) are compiled once and reported once, with every label that shares it."""
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", arch, 32)
    variants = _variants()
    first: Dict[str, int] = {}
    shared: Dict[int, List[int]] = {}
    for i, v in enumerate(variants):
        src, options, _ = _specialise(v.launch, target)
        key = f"{src.hash()}-{sorted(options.__dict__.items())!r}"
        shared.setdefault(first.setdefault(key, i), []).append(i)
    tasks = [(i, arch) for i in shared]
    if jobs <= 1:
        records = [_compile_by_index(t) for t in tasks]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_worker_init) as pool:
            records = list(pool.map(_compile_by_index, tasks))
    for record, (i, same) in zip(records, shared.items()):
        record["labels"] = [variants[j].label for j in same]
        record["default"] = any(variants[j].default for j in same)
        if len(same) > 1:
            record["label"] += f" (+{len(same) - 1})"
    return records


def _install(version: str) -> str:
    """``build/triton-<version>``, with that Triton release installed into it (once)."""
    target = os.path.join(ROOT, "build", f"triton-{version}")
    marker = os.path.join(target, f"triton-{version}.dist-info")
    if not os.path.isdir(marker):
        print(f"check_triton: installing triton=={version} into {os.path.relpath(target, ROOT)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                        f"triton=={version}"], check=True)
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", metavar="VERSION", help="check with this Triton release instead of the installed one")
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (default 90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: every core)")
    parser.add_argument("--json", metavar="FILE", help="also write every record to FILE (JSON lines in the "
                        "results schema of benchmarks/common.py)")
    args = parser.parse_args(argv)

    if args.triton:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [_install(args.triton), ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = rest.index("--triton") if "--triton" in rest else None
        rest = rest[:i] + rest[i + 2:] if i is not None else [a for a in rest if not a.startswith("--triton=")]
        return subprocess.run([sys.executable, os.path.abspath(__file__), *rest], env=env).returncode

    # compile for real (no interpreter), from scratch (ptxas runs, so its log has the spills)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sap_fast-check-triton-")
    sys.path.insert(0, ROOT)
    import triton
    import torch
    start = time.time()
    print(f"check_triton: triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch "
          f"{torch.__version__}, target sm_{args.arch}", flush=True)
    records = check(args.arch, args.jobs)
    for r in records:
        print(_line(r))
    failed = [r for r in records if r["status"] != "OK"]
    spilled = [r for r in records if r["status"] == "OK" and r["spill_stores"]]
    default_spills = [r for r in spilled if r["default"]]
    print(f"check_triton: triton {triton.__version__}, sm_{args.arch}: {len(records)} launches, "
          f"{len(failed)} failed to compile, {len(spilled)} spill ({len(default_spills)} of them "
          f"defaults), {time.time() - start:.0f} s")
    if args.json:  # one record per launch and figure, in the benchmarks' results schema
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from common import write_results

        write_results(args.json, {"device": f"sm_{args.arch}, compiled ahead of time on the CPU (no GPU)",
                                  "arch": args.arch, "records": records},
                      name="check_triton", triton=triton.__version__, torch=torch.__version__)
    return 1 if failed or default_spills else 0


if __name__ == "__main__":
    sys.exit(main())
