"""Runs the CUDA kernels' cases (cases.py) and counts the mismatches.

  python tests/cuda_emulation/check.py [--csrc DIR] [--save FILE]
      the kernels emulated on the CPU (HIP CPU runtime), built from DIR
      (default: this repository's csrc/); exit status 2 when the emulation
      cannot be built here (no HIP CPU runtime or TBB), 1 on mismatches.
  python tests/cuda_emulation/check.py --device cuda [--compare FILE] [--save FILE]
      the compiled extension's CUDA kernels on a GPU, against the oracle and,
      with --compare, bit for bit against saved emulated results.

Every case is also checked against the oracle; and where the CPU kernels
(the compiled extension) do the same arithmetic (the inputs' gradients,
one product each; emulated, Sinkhorn's outputs for n <= 16), bit for bit
against them.
"""
import argparse
import json
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402


def cpu_ops():
    """The CPU kernels, when the compiled extension is loaded."""
    import simplex_param as sp

    return torch.ops.simplex_param if sp.extension_loaded() else None


def fingerprint(t):
    """The bits of `t` (dtype, shape, bytes) as a short digest: results are
    compared across machines bit for bit without moving the tensors."""
    t = t.contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="emulated", choices=("emulated", "cuda"))
    parser.add_argument("--csrc", default=None, help="the source tree to build the emulation from")
    parser.add_argument("--save", default=None, help="write the results' fingerprints here (JSON)")
    parser.add_argument("--compare", default=None, help="saved fingerprints to match bit for bit")
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    label = "cuda-emulate" if args.device == "emulated" else "gpu-cases"
    t0 = time.monotonic()
    if args.device == "emulated":
        import build

        try:
            lib = build.build(**({"csrc": args.csrc} if args.csrc else {}))
        except build.Unavailable as exc:
            print(f"{label}: SKIPPED: {exc}")
            return 2
        ops, device = torch.ops.simplex_param_emulated, "cpu"
        print(f"{label}: built {os.path.basename(lib)} in {time.monotonic() - t0:.0f} s")
    else:
        import simplex_param as sp

        if not torch.cuda.is_available() or not sp.extension_loaded():
            print(f"{label}: FAILED: no CUDA device, or the extension is not loaded")
            return 1
        ops, device = torch.ops.simplex_param, "cuda"
    reference = cpu_ops()
    saved = None
    if args.compare:
        with open(args.compare) as f:
            saved = json.load(f)

    results, bad, same_as_saved = {}, 0, 0
    t1 = time.monotonic()
    todo = [c for c in C.all_cases() if args.k in c.name]
    for case in todo:
        got = C.run(case.to(device), ops)
        results[case.name] = {n: fingerprint(t) for n, t in got.items()}
        problems = C.mismatches(got, C.oracle(case))
        # mix's input gradients are sums of M products: other roundings than the CPU's.
        if reference is not None and not getattr(case, "mix", False):
            cpu = C.run(case, reference)
            # Sinkhorn, emulated: the CPU kernels' order of operations and
            # host math, so their bits (n <= 16; n = 17 is the composite on
            # CUDA, the generic loop on the CPU). On a GPU, nvcc's fused
            # multiply-adds and expf differ.
            sinkhorn_bits = (args.device == "emulated" and isinstance(case, C.SinkhornCase)
                             and case.logits.shape[-1] <= 16)
            problems += [f"{n}: not the CPU kernels' bits" for n in got
                         if (n.startswith("grad_x") or sinkhorn_bits)
                         and not torch.equal(got[n].view(-1).view(torch.uint8), cpu[n].view(-1).view(torch.uint8))]
        # Sinkhorn's bits on a GPU are not the emulation's (nvcc's fused
        # multiply-adds and CUDA's expf): the oracle only.
        if saved is not None and not isinstance(case, C.SinkhornCase):
            theirs = saved.get(case.name)
            if theirs is None or theirs.keys() != got.keys():
                problems.append("not in the saved results, or other outputs")
            else:
                differ = [n for n in got if theirs[n] != results[case.name][n]]
                problems += [f"{n}: not the saved results' bits" for n in differ]
                same_as_saved += not differ
        if problems:
            bad += 1
            print(f"MISMATCH {case.name}")
            for p in problems[:6]:
                print(f"    {p}")
        elif args.verbose:
            print(f"ok {case.name}")
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save, "w") as f:
            json.dump(results, f, indent=0, sort_keys=True)
    extra = f"; {same_as_saved} bitwise equal to {args.compare}" if saved is not None else ""
    print(f"{label}: {len(todo)} cases, {bad} mismatches{extra} ({time.monotonic() - t1:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
