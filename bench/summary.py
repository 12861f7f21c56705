"""gpu_check's last phase: summary.txt and summary.json from OUTDIR's phases.tsv, build_info.json,
doctor.json, the tests' log and results.jsonl (per phase: status and duration; per bench: dlmkern's
numbers, its speed-up over each baseline and, on a GPU run, the SPEC 6 targets met or missed).

    python bench/summary.py OUTDIR LOGDIR --wall SECONDS --mode gpu|dry-run

Standard library only, so it runs whatever broke before it. Ratios are derived here from the rows'
p50_ms (a baseline's p50 over dlmkern's); the rows never store them.
"""

from __future__ import annotations

import argparse
import json
import os

BASELINE = "dlmkern"
# SPEC 6 GPU targets: (op, what, threshold). what: a provider's speed-up (its p50 over
# dlmkern's), or a dlmkern figure: tflops, tok_s, token_ratio, peak_pct (of the naive path's).
TARGETS = [
    ("block_attention_fwd_bwd", "flex", 1.5), ("block_attention_fwd_bwd", "sdpa_dense", 8.0),
    ("block_attention_fwd_bwd", "tflops", 450.0),
    ("block_attention_packed_rounds", "token_ratio", 1.6),
    ("masked_logprobs_fwd_bwd", "tflops", 700.0), ("masked_logprobs_fwd_bwd", "peak_pct", 2.0),
    ("policy_value_loss_fwd_bwd", "device_copy", 0.8),
    ("block_sampler", "tok_s", 5000.0), ("block_sampler", "uncached", 10.0),
    ("tracerl_step", "peer_sdpa_dense", 6.0),
]
UPPER_BOUND = {"peak_pct"}  # targets that are maxima


def read_phases(out: str, logs: str) -> list[dict]:
    phases = []
    path = os.path.join(out, "phases.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, status, rc, secs, box = line.rstrip("\n").split("\t")
                phases.append({"name": name, "status": status, "rc": rc,
                               "seconds": float(secs), "box_s": int(box),
                               "log": os.path.join(logs, f"{name}.log")})
    return phases


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tests_line(logs: str) -> str | None:
    """pytest's closing line ('3 passed, 2 skipped in 4.1s'), if the log has one."""
    try:
        with open(os.path.join(logs, "tests.log")) as f:
            lines = [x.strip() for x in f if x.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if " in " in line and any(w in line for w in ("passed", "failed", "error", "skipped")):
            return line.strip("= ")
    return lines[-1] if lines else None


def group_rows(path: str) -> list[tuple[str, dict, dict]]:
    """Rows grouped by (op, shape), in file order: (op, shape, {provider: row})."""
    groups: dict[str, tuple[str, dict, dict]] = {}
    try:
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    except OSError:
        rows = []
    for r in rows:
        key = r["op"] + json.dumps(r["shape"], sort_keys=True)
        groups.setdefault(key, (r["op"], r["shape"], {}))[2][r["provider"]] = r
    return list(groups.values())


def key_numbers(op: str, shape: dict, rows: dict) -> dict:
    """dlmkern's figures, each baseline's speed-up over it, and derived figures."""
    ours = rows.get(BASELINE)
    entry = {"op": op, "shape": shape, "providers": sorted(rows)}
    if ours is None:
        return entry
    entry[BASELINE] = {k: ours[k] for k in ("p50_ms", "tflops", "gbps", "peak_mib")}
    entry["speedup"] = {p: round(r["p50_ms"] / ours["p50_ms"], 3)
                        for p, r in rows.items() if p != BASELINE}
    derived = {}
    if "tokens_packed" in shape:
        derived["token_ratio"] = round(shape["tokens_per_round"] / shape["tokens_packed"], 3)
    if op == "block_sampler":
        derived["tok_s"] = round(shape["batch"] * shape["new"] / (ours["p50_ms"] / 1e3), 1)
    naive = rows.get("naive")
    if naive and naive["peak_mib"] and ours["peak_mib"] is not None:
        derived["peak_pct"] = round(100 * ours["peak_mib"] / naive["peak_mib"], 2)
    entry["derived"] = derived
    return entry


def check_targets(entry: dict) -> list[dict]:
    values = {**entry.get("speedup", {}), **entry.get("derived", {}),
              "tflops": (entry.get(BASELINE) or {}).get("tflops")}
    out = []
    for op, what, threshold in TARGETS:
        if op != entry["op"] or values.get(what) is None:
            continue
        met = values[what] <= threshold if what in UPPER_BOUND else values[what] >= threshold
        out.append({"what": what, "value": values[what], "target": threshold, "met": met})
    return out


def render(summary: dict) -> str:
    lines = [f"gpu_check {summary['mode']}: {summary['wall_s']} s wall, "
             f"{'OK' if summary['ok'] else 'FAILED'}", "", "phases:"]
    for p in summary["phases"]:
        lines.append(f"  {p['name']:<28}{p['status']:<9}{p['seconds']:>8.1f} s of {p['box_s']:>3} s"
                     f"  rc {p['rc']}")
    b = summary["build"] or {}
    lines += ["", f"build: cuda kernels built {b.get('cuda_kernels_built')}, archs "
              f"{b.get('cuda_archs')}, registered {b.get('cuda_kernels_registered')}, torch "
              f"{b.get('torch_version')}",
              f"doctor: {'doctor.json written' if summary['doctor'] is not None else 'no json'}",
              f"tests: {summary['tests']}", "", "benches (speed-up = baseline p50 / dlmkern p50):"]
    for e in summary["benches"]:
        shape = " ".join(f"{k}={v}" for k, v in e["shape"].items())
        lines.append(f"  {e['op']}  {shape}")
        ours = e.get(BASELINE)
        if ours is None:
            lines.append(f"    no dlmkern row (providers: {', '.join(e['providers'])})")
            continue
        figs = [f"p50 {ours['p50_ms']:.4g} ms"] + [
            f"{ours[k]:.4g} {unit}" for k, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s"),
                                                  ("peak_mib", "MiB peak")) if ours[k] is not None]
        figs += [f"{k} {v}" for k, v in e["derived"].items()]
        figs += [f"{v:.2f}x vs {p}" for p, v in e["speedup"].items()]
        lines.append("    dlmkern: " + ", ".join(figs))
        for t in e.get("targets", []):
            op = "<=" if t["what"] in UPPER_BOUND else ">="
            lines.append(f"    SPEC 6: {t['what']} {t['value']} {op} {t['target']}: "
                         f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("logs")
    p.add_argument("--wall", type=float, default=0.0)
    p.add_argument("--mode", default="gpu", choices=["gpu", "dry-run"])
    a = p.parse_args()
    phases = read_phases(a.out, a.logs)
    benches = [key_numbers(*g) for g in group_rows(os.path.join(a.out, "results.jsonl"))]
    if a.mode == "gpu":
        for e in benches:
            e["targets"] = check_targets(e)
    summary = {
        "mode": a.mode, "wall_s": a.wall,
        "ok": bool(phases) and all(x["status"] in ("ok", "missing") for x in phases),
        "phases": phases, "build": read_json(os.path.join(a.out, "build_info.json")),
        "doctor": read_json(os.path.join(a.out, "doctor.json")), "tests": tests_line(a.logs),
        "benches": benches,
    }
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = render(summary)
    with open(os.path.join(a.out, "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
