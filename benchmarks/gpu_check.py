"""The GPU check (run through ``benchmarks/gpu_check.sh``): is the GPU path correct, how fast.

Within a time budget (default 300 s), on one GPU:

1. invariants on the device, in process: CPU states applied to a ResNet-18 on the GPU (fp32 and
   bf16 autocast, contiguous and channels-last): switched-off channels exactly zero, slimmed vs
   masked logits, batched vs looped energies, a masked training step;
2. ``edrop-ray prune`` on the default config with ``device=cuda``, on the local and
   the Ray backend, with amp none and with bf16 + channels_last; each run must finish and write a
   sane report;
3. ``bench_energy.py`` on the device (amp none and bf16): batched vs looped, masked vs dense;
4. the inputs of ``bench_scale.py --gpu-json``: ResNet-50 at 32 px, the time of one candidate's
   energy (32 candidates x 64 images in one batched pass) and of one masked training step (batch
   64), fp32 and bf16; the fp32 pair is written at the JSON's top level
   (``energy_ms_per_candidate``, ``train_step_ms``).

It writes one JSON of figures (with the card's name) and prints one verdict line: PASS, or FAIL
and why; the exit status is 0 on PASS, 1 on FAIL. The speed targets (batched >= 5x looped,
batched <= 1.10x dense) are reported on the verdict line but do not fail the check: it is a check
of correctness, and a record of figures.

``--dry-run`` runs the same steps on the CPU with the tests' tiny config and tiny benchmark
sizes, to check the check itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHANCE_FACTOR = 2.0  # a run's Top-1 must be at least twice chance (10 digits classes: 20 %)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config: check the check")
    p.add_argument("--device", help="default cuda (cpu with --dry-run)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs and the JSON")
    p.add_argument("--json", help="the figures' file (default OUT/gpu_check.json)")
    p.add_argument(
        "--budget-s", type=float, help="the whole check's time budget (300 s; dry run 1200 s)"
    )
    p.add_argument(
        "--epochs", type=int, help="epochs of each prune run (default: the config's, 5 on a GPU)"
    )
    return p.parse_args()


class Check:
    """The budget, the failures and the figures of one check."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.failures: list[str] = []
        self.notes: list[str] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def fail(self, reason: str) -> None:
        print(f"gpu_check: FAIL: {reason}", file=sys.stderr, flush=True)
        self.failures.append(reason)


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        env["card"] = torch.cuda.get_device_name(index)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        env["memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["gpus_visible"] = torch.cuda.device_count()
    else:
        env["card"] = f"none ({platform.processor() or platform.machine()} CPU)"
    return env


def invariants(device_name: str, size: int = 32, batch: int = 16) -> dict[str, Any]:
    """Masking, slimming, energies and a training step with CPU states on ``device_name``."""
    import torch

    from edrop_ray.energy import compute_energies
    from edrop_ray.masking import Masker
    from edrop_ray.models import build_model, example_input
    from edrop_ray.slim import slim_model
    from edrop_ray.train import build_optimizer, train_step
    from edrop_ray.units import discover_units

    device = torch.device(device_name)
    torch.manual_seed(0)
    cpu_model = build_model("resnet18", num_classes=10, in_channels=1)
    example = example_input(1, size)
    units = discover_units(cpu_model, example)
    g = torch.Generator().manual_seed(1)
    states = torch.rand(4, units.num_units, generator=g) < 0.5  # on the CPU, as Search keeps them
    x = torch.randn(batch, 1, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    # BN statistics that make a leaking channel visible
    with torch.no_grad():
        for m in cpu_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.bias.normal_(generator=g)
    slim_cpu = slim_model(cpu_model, units, states[0], example)
    out: dict[str, Any] = {}
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", None)):
        fmt = fmt or torch.channels_last
        model = build_model("resnet18", num_classes=10, in_channels=1)
        model.load_state_dict(cpu_model.state_dict())
        model = model.to(device=device, memory_format=fmt).eval()
        slim = slim_cpu.to(device=device, memory_format=fmt).eval()
        masker = Masker(model, units)
        xd = x.to(device).contiguous(memory_format=fmt)
        yd = y.to(device)
        seen: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        probes = [
            modules[n].register_forward_hook(lambda _m, _i, o, n=n, seen=seen: seen.update({n: o}))
            for n in units.mask_points
        ]
        for amp in ("none", "bf16"):
            key = f"{fmt_name}_{amp}"
            ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
            with torch.no_grad(), ac:
                with masker.applied(states[0]):
                    masked = model(xd).float()
                leaks = sum(
                    int(torch.count_nonzero(seen[n][:, ~states[0][u]]))
                    for n, u in units.mask_points.items()
                )
                slimmed = slim(xd).float()
            with torch.no_grad(), masker.applied(states[0]):
                exact = model(xd).float()
            scale = float(exact.abs().max())
            energies = compute_energies(model, masker, states, xd, yd, amp=amp)
            looped = compute_energies(model, masker, states, xd, yd, states_per_pass=1, amp=amp)
            out[key] = {
                "leaking_values": leaks,
                "max_abs_slimmed_vs_masked": float((slimmed - masked).abs().max()),
                "max_abs_masked_vs_fp32": float((masked - exact).abs().max()),
                "logit_scale": scale,
                "energies_finite": bool(torch.isfinite(energies).all()),
                "max_abs_energy_batched_vs_looped": float((energies - looped).abs().max()),
                "energy_scale": float(looped.abs().max()),
                "energy_spread": float(looped.max() - looped.min()),
            }
        for p in probes:
            p.remove()
        model.train()
        opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
        for amp in ("none", "bf16"):
            loss = train_step(model, opt, masker, states[1], xd, yd, amp=amp)
            out[f"{fmt_name}_{amp}"]["train_loss"] = loss
        masker.remove()
    return out


def check_invariants(check: Check, inv: dict[str, Any]) -> None:
    # Relative bounds: fp32 convolutions on a GPU run in TF32 by default (10-bit mantissa), bf16
    # keeps 8 bits; the slimmed and the masked model, or a pass over 4 replicas and one over 1,
    # may pick different kernels and so round differently. A wrong mask moves results by far more.
    for key, r in inv.items():
        bf16 = key.endswith("bf16")
        tol = (0.05 if bf16 else 0.01) * r["logit_scale"] + 1e-3
        e_tol = (0.03 if bf16 else 0.005) * r["energy_scale"] + 1e-3
        if r["leaking_values"]:
            check.fail(f"invariants {key}: {r['leaking_values']} values of switched-off channels")
        if r["max_abs_slimmed_vs_masked"] > tol:
            diff = r["max_abs_slimmed_vs_masked"]
            check.fail(f"invariants {key}: slimmed vs masked differ by {diff:.3g}")
        if not r["energies_finite"] or not math.isfinite(r["train_loss"]):
            check.fail(f"invariants {key}: non-finite energy or training loss")
        if r["max_abs_energy_batched_vs_looped"] > e_tol:
            check.fail(
                f"invariants {key}: batched vs looped energies differ by "
                f"{r['max_abs_energy_batched_vs_looped']:.3g}"
            )


def run(cmd: list[str], check: Check, label: str, log: Path) -> subprocess.Popen | None:
    """Run ``cmd`` within what is left of the budget; its output goes to ``log``."""
    timeout = check.left()
    if timeout <= 5:
        check.fail(f"{label}: not started, the {check.budget_s:.0f} s budget is spent")
        return None
    print(f"gpu_check: {label} ({timeout:.0f} s left)", flush=True)
    with open(log, "w") as f:
        # its own process group: on timeout, Ray's processes go with it
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            check.fail(f"{label}: still running when the budget ran out (log: {log})")
            return None
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        check.fail(f"{label}: exit status {proc.returncode}: {tail[0][:200]} (log: {log})")
    return proc


def cycle_medians(history: Path) -> dict[str, float | None]:
    """Median seconds per generation of a run's energies and of its whole cycle."""
    if not history.is_file():
        return {"energy_s_median": None, "cycle_s_median": None}
    import pyarrow.parquet as pq

    rows = pq.read_table(history).to_pylist()
    ends = [r["seconds"] for r in rows]
    cycles = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "energy_s_median": statistics.median(r["energy_seconds"] for r in rows) if rows else None,
        "cycle_s_median": statistics.median(cycles) if cycles else None,
    }


def prune_runs(check: Check, args, device: str, out: Path) -> list[dict[str, Any]]:
    base = ["--config", "configs/tiny.yaml"] if args.dry_run else []
    epochs = 1 if args.dry_run else args.epochs
    # the default config is 5 epochs of 22 steps: seconds of GPU work next to each run's start-up
    plans = [
        ("local_fp32", "local", "none", False),
        ("local_bf16_cl", "local", "bf16", True),
        ("ray_fp32", "ray", "none", False),
        ("ray_bf16_cl", "ray", "bf16", True),
    ]
    rows = []
    for name, backend, amp, cl in plans:
        run_dir = out / name
        sets = [f"device={device}", f"backend={backend}", f"amp={amp}"]
        sets += [f"channels_last={str(cl).lower()}"] + ([f"epochs={epochs}"] if epochs else [])
        if args.dry_run:  # CPU bf16 is slow: the fewest generations that still run every path
            sets += ["population_size=4", "energy_batch_size=8", "max_generations=2"]
            sets += ["num_evaluators=1"] if backend == "ray" else []
        cmd = [sys.executable, "-m", "edrop_ray", "prune", *base, "--out", str(run_dir)]
        cmd += ["--overwrite", "--quiet"] + [a for s in sets for a in ("--set", s)]
        t0 = time.perf_counter()
        proc = run(cmd, check, f"prune {name}", out / f"{name}.log")
        row: dict[str, Any] = {"name": name, "backend": backend, "amp": amp, "channels_last": cl}
        row["wall_s"] = time.perf_counter() - t0
        row["ok"] = proc is not None and proc.returncode == 0
        report = run_dir / "report.json"
        if row["ok"] and report.is_file():
            r = json.loads(report.read_text())
            keys = ("dense_top1", "pruned_top1", "prune_rate", "params_pruned", "generations")
            row.update({k: r.get(k) for k in (*keys, "converged_at", "steps", "dense_wall_s")})
            row["run_wall_s"] = r.get("wall_s")
            # where the time went: the run's phases, and per generation the energies and the
            # whole cycle (energies + training steps), medians over the run's generations
            row["timings"] = r.get("timings")
            row.update(cycle_medians(run_dir / "history.parquet"))
            chance = 100.0 / 10
            # the dry run's tiny config (16 px, 22 steps) leaves the pruned model near chance
            for k in ("dense_top1",) if args.dry_run else ("dense_top1", "pruned_top1"):
                v = r.get(k)
                if not isinstance(v, int | float) or not v >= CHANCE_FACTOR * chance:
                    check.fail(f"prune {name}: {k} = {v}, not above {CHANCE_FACTOR:g}x chance")
            if not 0.0 <= float(r.get("prune_rate", -1)) < 1.0:
                check.fail(f"prune {name}: prune_rate {r.get('prune_rate')} out of [0, 1)")
        elif row["ok"]:
            check.fail(f"prune {name}: no report.json in {run_dir}")
        rows.append(row)
    masks = {}
    for name in ("local_fp32", "ray_fp32"):
        path = out / name / "mask.pt"
        if path.is_file():
            import torch

            masks[name] = torch.load(path, weights_only=True)["mask"]
    if len(masks) == 2:  # a figure, not a failure: GPU kernels need not be deterministic
        check.notes.append(
            "local and ray fp32 masks "
            + ("equal" if bool((masks["local_fp32"] == masks["ray_fp32"]).all()) else "differ")
        )
    return rows


def energy_bench(check: Check, args, device: str, out: Path) -> dict[str, Any]:
    sizes = ["--states", "4", "--batch", "8", "--repeats", "1"] if args.dry_run else []
    threads = str(min(8, os.cpu_count() or 1))
    figures = {}
    for amp in ("none", "bf16"):
        path = out / f"bench_energy_{amp}.json"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "benchmarks/bench_energy.py", "--device", device, "--amp", amp]
        cmd += [*sizes, "--threads", threads, "--json", str(path)]
        proc = run(cmd, check, f"bench_energy amp={amp}", out / f"bench_energy_{amp}.log")
        if proc is not None and proc.returncode == 0 and path.is_file():
            figures[amp] = json.loads(path.read_text())
        elif proc is not None and proc.returncode == 0:
            check.fail(f"bench_energy amp={amp}: wrote no {path}")
    return figures


def scale_inputs(device_name: str, dry_run: bool) -> dict[str, Any]:
    """ResNet-50 per-candidate energy and training-step times: ``bench_scale.py``'s GPU inputs."""
    import torch

    from edrop_ray.energy import compute_energies
    from edrop_ray.masking import Masker
    from edrop_ray.models import build_model, example_input
    from edrop_ray.train import build_optimizer, train_step
    from edrop_ray.units import discover_units

    device = torch.device(device_name)
    model_name, size, batch, cands, repeats = ("resnet50", 32, 64, 32, 5)
    if dry_run:
        model_name, size, batch, cands, repeats = ("resnet18", 16, 8, 4, 1)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=3)
    units = discover_units(model, example_input(3, size))
    model = model.to(device)
    masker = Masker(model, units)
    g = torch.Generator().manual_seed(2)
    states = torch.rand(cands, units.num_units, generator=g) < 0.5
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def timed(fn) -> float:
        fn()  # warm-up (cuDNN autotuning, allocator)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1000.0

    out: dict[str, Any] = {"model": model_name, "input_size": size, "batch": batch}
    out["candidates"] = cands
    for amp in ("none", "bf16"):
        model.eval()
        e_ms = timed(lambda amp=amp: compute_energies(model, masker, states, x, y, amp=amp))
        model.train()
        t_ms = timed(lambda amp=amp: train_step(model, opt, masker, states[0], x, y, amp=amp))
        out[amp] = {"energy_ms_per_candidate": e_ms / cands, "train_step_ms": t_ms}
    masker.remove()
    return out


def main() -> int:
    args = parse_args()
    device = args.device or ("cpu" if args.dry_run else "cuda")
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "gpu_check.json"
    # the runs' dense baselines go to a cache of their own, fresh each time
    os.environ["EDROP_RAY_CACHE"] = str(out / "cache")
    # a private Ray instance on this machine's loopback only (as the tests do)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.budget_s is None:  # a 2-core CPU is far slower than a GPU, even on tiny sizes
        args.budget_s = 1200.0 if args.dry_run else 300.0
    check = Check(args.budget_s)
    result: dict[str, Any] = {"format": "edrop_ray.gpu_check/1", "dry_run": args.dry_run}
    try:
        import torch

        result["environment"] = env = environment(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            check.fail("no CUDA GPU is visible (run with --dry-run to check the script on a CPU)")
        else:
            sizes = (16, 8) if args.dry_run else (32, 16)
            # each phase on its own: a crash in one is a failure, and the others still run
            phases = [
                ("invariants", lambda: invariants(device, *sizes)),
                ("scale_inputs", lambda: scale_inputs(device, args.dry_run)),
                ("runs", lambda: prune_runs(check, args, device, out)),
                ("energy_bench", lambda: energy_bench(check, args, device, out)),
            ]
            for name, phase in phases:
                t0 = time.perf_counter()
                try:
                    result[name] = phase()
                except Exception as e:  # a crash is a verdict too, and still leaves the JSON
                    check.fail(f"{name}: {type(e).__name__}: {e}".splitlines()[0][:300])
                    traceback.print_exc()
                result[f"{name}_s"] = time.perf_counter() - t0
            if "invariants" in result:
                check_invariants(check, result["invariants"])
            if "scale_inputs" in result:  # the keys bench_scale.py --gpu-json reads
                result.update(result["scale_inputs"]["none"])
    except Exception as e:
        check.fail(f"{type(e).__name__}: {e}".splitlines()[0][:300])
        env = result.get("environment", {})
    result["wall_s"] = time.monotonic() - check.t0
    if result["wall_s"] > args.budget_s:
        check.fail(f"took {result['wall_s']:.0f} s, over the {args.budget_s:.0f} s budget")
    targets = []
    for amp, f in result.get("energy_bench", {}).items():
        su, ov = f["speedup_batched_vs_looped"], f["batched_over_dense"]
        targets.append(
            f"{amp}: batched/looped {su:.2f}x ({'met' if su >= 5 else 'missed'} >=5x), "
            f"batched/dense {ov:.2f}x ({'met' if ov <= 1.10 else 'missed'} <=1.10x)"
        )
    verdict = "FAIL" if check.failures else "PASS"
    result.update(verdict=verdict, failures=check.failures, notes=check.notes, targets=targets)
    json_path.write_text(json.dumps(result, indent=2, default=str))
    card = env.get("card", "?")
    why = check.failures[0] if check.failures else "every run finished, invariants hold"
    extra = f" [+{len(check.failures) - 1} more]" if len(check.failures) > 1 else ""
    print(
        f"gpu_check {verdict}{' (dry run, CPU)' if args.dry_run else ''} on {card} in "
        f"{result['wall_s']:.0f} s: {why}{extra}; {'; '.join(targets) or 'no energy figures'}; "
        f"figures: {json_path}"
    )
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
