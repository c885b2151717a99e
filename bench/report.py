"""Writes docs/benchmarks.md from the benchmarks' JSON in bench/out (nothing in it is typed by hand).

Reads ``fit_bench.json``, ``score_bench.json``, ``retrieval_bench.json``, ``scale.json`` and, when
present, ``accuracy.json``, ``fact_tracing.json`` (+ ``fact_tracing_mrr.png``) and
``fact_tracing_demo.json``, ``attribute.json``, ``gradindex.json`` and ``counterfactual.json`` (+ ``counterfactual_details.json``,
``counterfactual.png``). A missing JSON becomes a line naming the command that produces it.
``--only attribute|counterfactual|fit_memory|gradindex|scale|speed`` rewrites those sections of an existing page in place (the
others keep what they say), for a machine that ran only those benchmarks.

    .venv/bin/python -m bench.report [--out-dir bench/out] [--doc docs/benchmarks.md] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from bench.common import target_verdict as verdict

ROOT = Path(__file__).resolve().parent.parent
PY = ".venv/bin/python"
COMMANDS = {
    "fit_bench": f"{PY} -m bench.fit_bench",
    "fit_memory": f"{PY} -m bench.fit_memory",
    "score_bench": f"{PY} -m bench.score_bench",
    "retrieval_bench": f"{PY} -m bench.retrieval_bench",
    "scale": f"{PY} -m bench.scale",
    "accuracy": f"{PY} -m bench.accuracy",
    "fact_tracing": f"{PY} -m bench.fact_tracing",
    "fact_tracing_demo": f"{PY} -m bench.fact_tracing_demo",
    "counterfactual": "make bench-counterfactual",
    "attribute": f"{PY} -m bench.attribute_bench",
    "gradindex": "make bench-gradindex",
}
ATTRIBUTE_HEAD = "## Attribution memory and time (`attribute.json`)"
GRADINDEX_HEAD = "## Gradient index: whole-corpus search, recall and cost (`gradindex.json`)"
FIT_MEMORY_HEAD = "## Fit memory per process (`fit_memory.json`)"
COUNTERFACTUAL_HEAD = "## Counterfactual benchmarks: multi-stage LDS and top-k removal (`counterfactual.json`)"


def load(out_dir: Path, name: str) -> dict | None:
    path = out_dir / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def missing(name: str) -> str:
    return f"_Not run: `bench/out/{name}.json` is missing; `{COMMANDS[name]}` produces it._\n"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def f2(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def command_of(name: str, data: dict) -> str:
    cmd = data.get("command")
    if cmd:
        cmd = cmd.replace(str(ROOT) + "/", "")
        # the form a record of any age names the script in: python -m bench.NAME (older: python bench/NAME.py)
        cmd = re.sub(r"^python (?:-m bench\.|bench/)(\w+)(?:\.py)?", lambda m: f"{PY} -m bench.{m[1]}", cmd)
        return cmd.strip()
    return COMMANDS[name]


# ----------------------------------------------------------------------------------------------


def machine_section(data: dict[str, dict | None]) -> str:
    out = ["## Machine\n"]
    seen = {}
    for name, d in data.items():
        if d and isinstance(d.get("machine"), dict):
            m = {k: v for k, v in d["machine"].items() if not k.startswith("load_average")}
            seen.setdefault(json.dumps(m, sort_keys=True), (m, []))[1].append(name)
        elif d and name == "accuracy":
            m = {"torch": d.get("torch"), "threads": d.get("threads")}
            seen.setdefault(json.dumps(m, sort_keys=True), (m, []))[1].append(name)
    if not seen:
        return "## Machine\n\nNo JSON records its machine.\n"
    for m, names in seen.values():
        out.append(f"Recorded by {', '.join(f'`{n}.json`' for n in names)}:\n")
        out.append(table(["key", "value"], [[k, v] for k, v in m.items()]))
    loads = [(n, d["machine"].get("load_average_start")) for n, d in data.items()
             if d and isinstance(d.get("machine"), dict) and d["machine"].get("load_average_start")]
    if loads:
        out.append("Load average (1/5/15 min) at the start of each run: "
                   + "; ".join(f"{n}: {' / '.join(f'{x:.2f}' for x in la)}" for n, la in loads) + ".\n")
    return "\n".join(out)


def commands_section(data: dict[str, dict | None]) -> str:
    rows = [[f"`{n}.json`", f"`{command_of(n, d) if d else COMMANDS[n]}`", "yes" if d else "**missing**"]
            for n, d in data.items()]
    return ("## Commands\n\n`make bench` runs all of them in this order and then `" + f"{PY} -m bench.report"
            + "`, which writes this page.\n\n" + table(["output", "command", "present"], rows))


def summary_section(data: dict[str, dict | None]) -> str:
    rows = []
    fit, score, ret = data["fit_bench"], data["score_bench"], data["retrieval_bench"]
    if fit:
        r, t = fit["ratios"], fit["targets"]
        rows.append(["fitting: hub_msif / kronfluence EK-FAC (wall)", f2(r["hub_msif_over_kronfluence"]),
                     verdict(r["hub_msif_over_kronfluence"], t["hub_msif_over_kronfluence"])])
        rows.append(["fitting: hub_msif / two-pass floor", f2(r["hub_msif_over_floor"]),
                     verdict(r["hub_msif_over_floor"], t["hub_msif_over_floor"])])
        rows.append(["factor size: hub_msif float32 / kronfluence", f2(r["size_over_kronfluence"]),
                     verdict(r["size_over_kronfluence"], t["size_over_kronfluence"])])
        rows.append(["factor size: hub_msif bfloat16 / kronfluence", f2(r["size_bf16_over_kronfluence"]), "no target"])
    else:
        rows.append(["fitting and factor size", "-", missing("fit_bench").strip()])
    if score:
        r, t = score["ratios"], score["targets"]
        for q in score["setup"]["query_counts"]:
            key = f"ms_if_q{q}_over_floor"
            if key in r:
                rows.append([f"scoring: MS-IF Q = {q} / one forward+backward", f2(r[key]),
                             verdict(r[key], t["ms_if_over_floor"])])
        if "kronfluence_over_hub_msif" in r:
            rows.append(["scoring: kronfluence / hub_msif (SS-IF, Q = 32)", f2(r["kronfluence_over_hub_msif"]),
                         verdict(r["kronfluence_over_hub_msif"], t["kronfluence_over_hub_msif"], higher_is_better=True)])
        if "memory_4c_over_c" in r:
            rows.append(["scoring peak memory increase: 4C / C", f2(r["memory_4c_over_c"]),
                         verdict(r["memory_4c_over_c"], t["memory_4c_over_c"])])
    else:
        rows.append(["scoring", "-", missing("score_bench").strip()])
    if ret:
        for row in ret["results"]:
            rows.append([f"retrieval: one query top-{ret['setup']['top']} over {row['documents']:,} documents (ms)",
                         f2(row["query_median_ms"]), "no target"])
    else:
        rows.append(["retrieval latency", "-", missing("retrieval_bench").strip()])
    return ("## Summary: speed and size\n\nEvery ratio is measured side by side in one run of its benchmark.\n\n"
            + table(["measure", "value", "target"], rows))


def fit_section(d: dict | None) -> str:
    head = "## Fitting (`fit_bench.json`)\n\n"
    if not d:
        return head + missing("fit_bench")
    s, res, r = d["setup"], d["results"], d["ratios"]
    floor = res["floor"]["seconds"]
    kron = res["kronfluence"]
    text = head + (f"GPT-NeoX, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, FFN {s['ffn']}, "
                   f"vocab {s['vocab']} ({s['parameters']:,} parameters), random init; {s['sequences']} sequences x "
                   f"{s['seq_len']} tokens, batch {s['batch_size']}, {len(s['modules'])} tracked modules; best of "
                   f"{s['repeats']} run(s). Command: `{command_of('fit_bench', d)}`.\n\n")
    rows = [["floor: 2 x (forward + backward with parameter gradients)", f2(floor), f2(res["floor"]["cpu_seconds"]), "1.00", ""]]
    rows.append(["hub_msif fit (sampled labels, per-head blocks)", f2(res["hub_msif"]["seconds"]),
                 f2(res["hub_msif"]["cpu_seconds"]), f2(r["hub_msif_over_floor"]), mb(res["hub_msif"]["bytes"])])
    if "hub_msif_empirical" in res:
        e = res["hub_msif_empirical"]
        rows.append(["hub_msif fit (empirical labels, no head split)", f2(e["seconds"]), f2(e["cpu_seconds"]),
                     f2(r["hub_msif_empirical_over_floor"]), mb(e["bytes"])])
    if "hub_msif_bf16" in res:
        rows.append(["hub_msif factors saved in bfloat16", "", "", "", mb(res["hub_msif_bf16"]["bytes"])])
    rows.append(["kronfluence 1.0.1 EK-FAC fit (sampled labels)", f2(kron["seconds"]), f2(kron["cpu_seconds"]),
                 f2(r["kronfluence_over_floor"]), mb(kron["bytes"])])
    for phase, p in kron.get("phases", {}).items():
        rows.append([f"  of which kronfluence {phase}", f2(p["seconds"]), f2(p["cpu_seconds"]), "", ""])
    text += table(["", "wall s", "CPU s", "/ floor", "folder size"], rows)
    m = d.get("machine", {})
    if "load_average_start" in m:
        text += (f"\nMachine: {m.get('cpu')}, {m.get('cpu_count')} CPUs, {m.get('torch_threads')} torch threads; "
                 f"1-minute load average {m['load_average_start'][0]:.1f} at the start and "
                 f"{m.get('load_average_end', [float('nan')])[0]:.1f} at the end of this run"
                 + (" (busy with other work: wall times are noisy, CPU seconds less so)."
                    if max(m["load_average_start"][0], m.get("load_average_end", [0])[0]) > (m.get("cpu_count") or 1)
                    else ".") + "\n")
    cpu = d.get("cpu_ratios", {})
    checks = [[k, f2(r[k]), f2(cpu.get(k)), verdict(r[k], d["targets"][k])] for k in d["targets"]]
    text += "\n" + table(["ratio", "wall", "CPU seconds", "target (wall)"], checks)
    return text + phase_table(d)


def phase_table(d: dict) -> str:
    """Where hub_msif's fit spends its time (the manifest's ``fit.phase_seconds``), per model."""
    runs = []
    if "phase_seconds" in d["results"]["hub_msif"]:
        s = d["setup"]
        runs.append((f"bench model ({s['sequences']} x {s['seq_len']} tokens)", d["results"]["hub_msif"]))
    if d.get("phases"):
        p = d["phases"]
        runs.append((f"{p['model']} ({p['sequences']} x {p['seq_len']} tokens)", p))
    if not runs:
        return ""
    names = list(runs[0][1]["phase_seconds"])
    rows = [[label, f2(run["seconds"])] + [f"{run['phase_seconds'][k]:.2f} ({run['phase_seconds'][k] / run['seconds']:.0%})"
                                           for k in names] for label, run in runs]
    return ("\nWhere the fit's time goes (wall seconds of the main process, share of the whole fit; "
            "`forward_backward` includes the capture hooks):\n\n"
            + table(["fit", "total s", *names], rows))


def fit_memory_section(d: dict | None) -> str:
    """Per-process peak memory of real fits at 1, 2 and 4 processes, next to each rank's plan."""
    head = FIT_MEMORY_HEAD + "\n\n"
    if not d:
        return head + missing("fit_memory")
    c = d["config"]
    text = head + (f"GPT-NeoX, {c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, FFN {c['ffn']}, vocab "
                   f"{c['vocab']}, float32, random init; {c['sequences']} sequences x {c['seq_len']} tokens, batch "
                   f"{c['batch_size']}, float64 sums; each setting in fresh processes (`accelerate launch`, gloo, "
                   f"one thread each). Increase = peak resident memory during the fit (`VmHWM` reset just before) "
                   f"less the resident memory before it; plan = the rank's planned peak less the model weights. "
                   f"Command: `{command_of('fit_memory', d)}`.\n\n")
    rows = []
    for run in d["runs"]:
        key = f"p{run['processes']}_k{run['partitions']}"
        ratio = d["ratios"][key]
        rows.append([run["processes"], run["partitions"], run["passes"], f2(run["fit_seconds"], 1),
                     f2(run["fit_cpu_seconds"], 1),
                     ", ".join(f2(p["fit_increase_mib"], 1) for p in run["per_process"]),
                     ", ".join(f2(x, 1) for x in run.get("planned_increase_mib", [])),
                     f2(ratio["fit_increase_over_k1"]), f2(ratio.get("planned_increase_over_k1"))])
    return text + table(["processes", "K", "passes", "fit wall s", "fit CPU s (all)", "increase per rank MiB",
                         "plan per rank MiB", "largest increase / 1 process K=1", "plan / 1 process K=1"], rows)


def score_section(d: dict | None) -> str:
    head = "## Scoring (`score_bench.json`)\n\n"
    if not d:
        return head + missing("score_bench")
    s, t, r = d["setup"], d["times"], d["ratios"]
    floor = t["floor"]["seconds"]
    text = head + (f"GPT-NeoX, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, FFN {s['ffn']}, vocab "
                   f"{s['vocab']}, {s['dtype']}; C = {s['candidates']} candidates x {s['seq_len']} tokens; queries of "
                   f"{s['query_len']} tokens ({s['answer_len']} answer tokens); each stage fitted on "
                   f"{s['fit_sequences']} sequences; relative damping {s['damping_relative']}; batch {s['batch_size']}; "
                   f"median of {s['repeats']} rounds. Command: `{command_of('score_bench', d)}`.\n\n")
    rows = [["one forward+backward over the C candidates (floor)", f2(floor), "1.00"]]
    for q in s["query_counts"]:
        for part in ("query_gradients", "precondition", "score", "total"):
            key = f"ms_if_q{q}_{part}"
            if key in t:
                label = {"query_gradients": "query gradients (not in the ratio)", "precondition": "preconditioning, both stages",
                         "score": "scoring the candidates", "total": "**preconditioning + scoring**"}[part]
                rows.append([f"MS-IF Q = {q}: {label}", f2(t[key]["seconds"]), f2(t[key]["seconds"] / floor)])
    for key, label in (("ss_if_q32_total", "SS-IF Q = 32, hub_msif, with query gradients"),
                       ("ss_if_q32_precondition_score", "SS-IF Q = 32, hub_msif, preconditioning + scoring"),
                       ("kronfluence", "SS-IF Q = 32, kronfluence `compute_pairwise_scores`")):
        if key in t:
            rows.append([label, f2(t[key]["seconds"]), f2(t[key]["seconds"] / floor)])
    text += table(["", "wall s", "/ floor"], rows)
    checks = []
    targets = d["targets"]
    for q in s["query_counts"]:
        k = f"ms_if_q{q}_over_floor"
        if k in r:
            checks.append([f"MS-IF Q = {q} / floor", f2(r[k]), verdict(r[k], targets["ms_if_over_floor"])])
    if "kronfluence_over_hub_msif" in r:
        checks.append(["kronfluence / hub_msif (SS-IF Q = 32)", f2(r["kronfluence_over_hub_msif"]),
                       verdict(r["kronfluence_over_hub_msif"], targets["kronfluence_over_hub_msif"], True)])
        checks.append(["same, hub_msif without query gradients", f2(r["kronfluence_over_hub_msif_precondition_score"]),
                       "for reference"])
    if "memory_4c_over_c" in r:
        checks.append(["peak memory increase 4C / C", f2(r["memory_4c_over_c"]),
                       verdict(r["memory_4c_over_c"], targets["memory_4c_over_c"])])
    text += "\n" + table(["ratio", "value", "target"], checks)
    if d.get("memory"):
        m = d["memory"]
        text += (f"\nPeak memory of MS-IF scoring (Q = {m['queries']}), each size in a fresh process "
                 f"({m['runs'][0]['method']}):\n\n")
        text += table(["candidates", "increase MiB", "resident before MiB", "peak MiB", "wall s"],
                      [[x["candidates"], f2(x["increase_mib"], 1), f2(x["rss_before_mib"], 1), f2(x["peak_mib"], 1),
                        f2(x["seconds"])] for x in m["runs"]])
    if d.get("agreement"):
        text += "\nAgreement of hub_msif's SS-IF scores with kronfluence's (Q = 32):\n\n"
        rows = [[k.replace("_", " "), f"{v['pearson']:.6f}", f"{v['spearman_mean']:.6f}",
                 f"{v['max_abs_difference_over_max_abs']:.2e}"] for k, v in d["agreement"].items()]
        text += table(["hub_msif factors", "Pearson", "mean Spearman", "max abs diff / max abs"], rows)
        if "matched_correlation" in targets:
            p = d["agreement"].get("matched_factors", {}).get("pearson")
            text += f"\nMatched factors, Pearson {verdict(p, targets['matched_correlation'], True, 6)}.\n"
    return text


def scale_section(d: dict | None) -> str:
    head = "## Scale on paper (`scale.json`)\n\n"
    if not d:
        return head + missing("scale")
    text = head + (f"Computed from published shapes, no model downloaded. Command: `{command_of('scale', d)}`.\n\n"
                   f"Sizes: {d['assumptions']['sizes']}.\n\n")
    if d.get("cross_check"):
        text += "Cross-check of the size formula against factors fitted with `fit_factors` on tiny models:\n\n"
        text += table(["architecture", "dtype", "modules", "files", "formula bytes", "tensor bytes in files", "equal"],
                      [[c["arch"], c["dtype"], c["modules"], c["files"], c["formula_bytes"], c["file_tensor_bytes"],
                        "yes" if c["equal"] else "**NO**"] for c in d["cross_check"]])
    rows = []
    for model_id, r in d["models"].items():
        c, s = r["config"], r["sizes"]
        rows.append([model_id, f"{r['parameters'] / 1e9:.2f} B",
                     f"{c['layers']} x (h {c['hidden']}, {c['heads']}/{c['kv_heads']} heads, FFN {c['ffn']})",
                     r["tracked_modules"], gb(s["all_float32"]["stage_bytes"]), gb(s["all_float32"]["pair_bytes"]),
                     gb(s["all_bfloat16"]["pair_bytes"]), gb(s["mlp_float32"]["pair_bytes"]),
                     gb(s["mlp_bfloat16"]["pair_bytes"])])
    text += "\nFactor artifact (1 GB = 1e9 bytes):\n\n" + table(
        ["model", "parameters", "shape", "modules", "stage f32", "pair f32", "pair bf16", "MLP pair f32", "MLP pair bf16"],
        rows)
    first = next(iter(d["models"].values()))["fit_memory"]["all_bfloat16"]
    text += (f"\nMemory of one fitting process (batch {first['batch_size']} x {first['seq_len']} tokens). "
             f"Assumptions: {d['assumptions']['memory']} {d['assumptions']['model_dtype_note']}.\n\n")
    comps = list(first["components_bytes"])
    gpus = list(first["fits_on"])
    rows = []
    for model_id, r in d["models"].items():
        for key, m in r["fit_memory"].items():
            which, _ = key.split("_", 1)
            rows.append([model_id, "all" if which == "all" else "MLP", m["model_dtype"]]
                        + [gb(m["components_bytes"][c]) for c in comps] + [f"**{gb(m['total_bytes'])}**"]
                        + ["yes" if m["fits_on"][g] else "no" for g in gpus])
    text += table(["model", "modules", "model dtype"] + [c.replace("_", " ") for c in comps] + ["total"]
                  + [f"fits {g}" for g in gpus], rows)
    if d.get("on_paper"):
        text += (f"\nThe memory plan (`hub_msif.factors.memory_plan`, `hub-msif fit --plan`) of each pair on 1 and 8 processes, "
                 f"batch {d['batch_size']} x {d['seq_len']} tokens, float64 sums, each stage with the fewest module "
                 "partitions K that fit the budget (2K passes over the data per stage). Processes divide the time; "
                 "partitions (and float32 sums) lower the peak:\n\n")
        rows = []
        for r in d["on_paper"]:
            ks = "/".join(str(st["module_partitions"]) for st in r["stages"].values())
            rows.append([r["pair"], r["processes"], gb(r["budget_bytes"]), ks, r["passes"],
                         f"**{gb(r['per_process_peak_bytes'])}**", gb(r["pair_artifact_bytes"]),
                         "yes" if r["fits"] else "**no**"])
        text += table(["pair", "processes", "budget", "K (pt/ft)", "passes", "peak per process", "pair artifact",
                       "fits"], rows)
        targets = d.get("targets_bytes") or {}
        if targets:
            text += "\nTargets: " + "; ".join(f"{name} <= {gb(v)} per process on 8 processes"
                                               for name, v in targets.items()) + ".\n"
    text += "\nMulti-GPU fit launch commands (add `--max-memory` to pick the partitions):\n\n"
    for model_id, r in d["models"].items():
        text += f"- {model_id}: `{r['launch']['all']}`\n"
    return text


def retrieval_section(d: dict | None) -> str:
    head = "## Retrieval latency (`retrieval_bench.json`)\n\n"
    if not d:
        return head + missing("retrieval_bench")
    s = d["setup"]
    text = head + (f"{s['index']} over {s['vectors']} {s['dim']}-d vectors; one query at a time, top {s['top']}, "
                   f"{s['queries']} queries; faiss {d['machine']['faiss']}, {d['machine']['faiss_threads']} threads. "
                   f"Command: `{command_of('retrieval_bench', d)}`.\n\n")
    return text + table(["documents", "build ms", "query median ms", "query p90 ms"],
                        [[f"{r['documents']:,}", f2(1000 * r["build_seconds"], 1), f2(r["query_median_ms"]),
                          f2(r["query_p90_ms"])] for r in d["results"]])


def accuracy_section(d: dict | None) -> str:
    head = "## Accuracy against the exact Gauss-Newton influence (`accuracy.json`)\n\n"
    if not d:
        return head + missing("accuracy")
    text = head + f"Command: `{command_of('accuracy', d)}`.\n\n"
    if d.get("model"):
        m = d["model"]
        text += (f"GPT-NeoX, {m.get('layers')} layers, hidden {m.get('hidden')}, {m.get('heads')} heads, FFN {m.get('ffn')}, "
                 f"vocab {m.get('vocab')}, {m.get('tracked_parameters')} tracked parameters")
        if d.get("data"):
            x = d["data"]
            text += f"; {x.get('fit_sequences')} fitting sequences, {x.get('queries')} queries, {x.get('candidates')} candidates"
        text += ".\n\n"
    gt = d.get("ground_truth", {})
    if gt:
        res = gt.get("cg_relative_residuals") or [None]
        text += (f"Ground truth: {gt.get('method')}; damping {gt.get('damping'):.4g} ({gt.get('damping_rule')}); "
                 f"max CG relative residual {max(r for r in res if r is not None) if any(r is not None for r in res) else '-'}.\n\n")
    rows = [[name, f2(r.get("spearman_mean"), 3), f2(r.get("spearman_std"), 3), f2(r.get("pearson_mean"), 3),
             f2(r.get("pearson_std"), 3)] for name, r in d.get("results", {}).items()]
    text += table(["method", "Spearman mean", "std", "Pearson mean", "std"], rows)
    if d.get("checks"):
        results = d.get("results", {})
        ek = results.get("EK-FAC (hub_msif, per-head blocks)", {}).get("spearman_mean")
        lines = []
        for k, v in d["checks"].items():
            extra = f" (EK-FAC Spearman {ek:.3f})" if (not v and "spearman" in k and ek is not None) else ""
            lines.append([k, "met" if v else f"**missed**{extra}"])
        text += "\n" + table(["check", "result"], lines)
    return text


def _method_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        damp = "-" if r.get("damping") is None else f"{r['damping']:g}"
        mrr, rec = f2(r["mrr"], 3), f2(r["recall_at_10"], 3)
        if "mrr_std" in r:
            mrr += f" ({r['mrr_std']:.3f})"
            rec += f" ({r['recall_at_10_std']:.3f})"
        out.append([r["method"], damp, mrr, rec])
    return out


def fact_tracing_section(d: dict | None, out_dir: Path, doc: Path) -> str:
    head = "## Fact tracing (`fact_tracing.json`)\n\n"
    if not d:
        return head + missing("fact_tracing")
    n = len(d.get("trials", [])) or "?"
    text = head + (f"Command: `{COMMANDS['fact_tracing']}`. Mean (std) over {n} trial(s); each trial is a new "
                   f"fact world and model pair; {f2(d.get('seconds'), 0)} s in all.\n\n")
    text += table(["method", "damping (relative)", "MRR", "Recall@10"], _method_rows(d["rows"]))
    png = out_dir / "fact_tracing_mrr.png"
    if png.is_file():  # copied next to the page: bench/out/ is not committed, docs/ is
        shutil.copyfile(png, doc.parent / png.name)
        text += f"\n![MRR over damping]({png.name})\n"
    return text


def fact_tracing_demo_section(d: dict | None) -> str:
    head = "## Fact tracing on the demo's world (`fact_tracing_demo.json`)\n\n"
    if not d:
        return head + missing("fact_tracing_demo")
    text = head + (f"Command: `{COMMANDS['fact_tracing_demo']}` (uses, or builds, the demo's cache). Each held-out question reranks the "
                   f"{d['candidates']} documents retrieved for it; share of questions with a true proponent among "
                   f"them: {d['coverage']:.2f}.\n\n")
    return text + table(["method", "damping (relative)", "MRR", "Recall@10"], _method_rows(d["rows"]))


def _ci(v: dict, key: str = "mean", ci: str = "ci") -> str:
    return f"{v[key]:+.3f} [{v[ci][0]:+.3f}, {v[ci][1]:+.3f}]"


FAMILY_ORDER = ("ms-if", "ss-if", "gdp", "repsim", "bm25", "true-proponents", "random")


def _setting_order(key: str) -> tuple:
    """Methods in FAMILY_ORDER first, then each family's settings by damping."""
    family, _, damping = key.partition("@")
    base = family.split("+")[0]
    rank = FAMILY_ORDER.index(base) if base in FAMILY_ORDER else len(FAMILY_ORDER)
    try:
        value = float(damping) if damping else -1.0
    except ValueError:
        value = 0.0
    return (bool(damping), rank, family, value)


def _verdict(diff: dict | None) -> str:
    if not diff:
        return "-"
    if diff.get("queries", 0) < 5:  # lds.MIN_PAIRED: no verdict from a handful of queries
        return f"no verdict ({diff.get('queries')} queries)"
    return {1: "**A beats B**", -1: "B beats A", 0: "no difference shown"}[diff["beats"]]


def counterfactual_section(d: dict | None, details: dict | None, out_dir: Path, doc: Path) -> str:
    head = COUNTERFACTUAL_HEAD + "\n\n"
    if not d:
        return head + missing("counterfactual")
    details = details or {"worlds": {}}
    secs = details.get("seconds")
    argv = details.get("argv") or {}
    text = head + (
        f"Command: `{COMMANDS['counterfactual']}` (`bench/counterfactual.py`"
        + (f" {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in argv.items() if k in ('seeds', 'subsets', 'removal_queries', 'random_draws', 'workers'))}"
           if argv else "")
        + ("; reported from the cached pairs with `--cached-only`). " if details.get("cached_only") else
           f"; {f2(secs, 0)} s for this run, counting only the pairs not already in the cache; load average "
           f"{f2((details.get('load_average_start') or [None])[0], 1)} at its start). ")
        + "Protocol (docs/design.md, \"Counterfactual benchmarks\"): every pair is a tiny GPT-NeoX trained under "
        "each of S paired seeds (its initialisation and batch schedule) along the whole corpus's batch schedule, "
        "the removed documents masked out of their batches; a measured effect is the seed-averaged difference from "
        "the same seed's full pair. Only **known** queries count: the attributed (first-seed) pair answers them "
        "right and the answer's log-probability beats the relation's most frequent other answer by at least "
        "1 nat (mean over seeds). The queries are split by a seed into a **select** half, on which each method's "
        "setting (damping, per-stage dampings, contrastive query, unit normalisation) is chosen by mean LDS, and a "
        "**report** half, on which every number below is measured, for every method alike. **LDS**: Spearman, over "
        "M half-corpus masks, between a method's predicted effect (sum of its scores over the kept documents) and "
        "the seed-averaged answer log-probability, per query; mean [bootstrap 95% CI]. **Removal**: the top k "
        "documents of the chosen setting removed, seed-averaged answer-loss increase (nats, mean [95% CI] over "
        "queries), share of right answers that flip (over queries x seeds). **Ceiling**: the proponent-indicator "
        "score (1 on the fact's proponents, 0 elsewhere) for LDS; removing the true proponents for removal. "
        "**Random spread**: the standard deviation, between random draws of k removed documents, of one query's "
        "seed-averaged loss change (the noise floor). \"A beats B\" only where the paired difference's 95% "
        "interval excludes 0.\n\n")
    for name, w in d["worlds"].items():
        info = details["worlds"].get(name, {})
        text += f"### {name}\n\n"
        if info:
            spec = info["spec"]
            acc_nd = w.get("accuracy_nondefault")
            text += (f"{info['documents']} pre-training documents, {info['finetune_pairs']} fine-tuning pairs, "
                     f"{info['queries']} held-out queries. The attributed pair answers **{w['accuracy']:.0%}** of them "
                     f"and **{f2(acc_nd and 100 * acc_nd, 0)}%** of the {info['nondefault_queries']} whose answer is "
                     f"not the relation's most frequent one; {w['known_queries']} are known with the margin "
                     f"({len(info['select_known'])} select, {len(info['report_known'])} report). Model: hidden "
                     f"{spec['train']['hidden']}, {spec['train']['layers']} layers, {spec['train']['pretrain_steps']} + "
                     f"{spec['train']['finetune_steps']} steps; S = {w['seeds']} seeds, M = {info['subsets']}; "
                     f"{info['pairs_trained']} pairs trained, {info['pair_seconds']['mean']:.1f} s per pair "
                     f"({f2(info['pair_seconds'].get('cpu_mean'), 1)} CPU-s). Random spread "
                     f"**{f2(w.get('random_spread'), 3)} nats** seed-averaged "
                     f"({f2(info.get('random_spread_single_seed'), 3)} for one seed, over {info['random_draws']} "
                     f"draws).\n\n")
            if not info.get("complete", True):
                text += (f"**Partial run** (reported from the cache before every pair was trained): LDS over "
                         f"{info['subsets']} of the {info.get('subsets_planned')} planned subsets, "
                         f"{info.get('removal_pairs_done', '?')} of {info.get('removal_pairs_planned', '?')} removal "
                         f"pairs (a removal counts once all its seeds are trained). "
                         f"`{COMMANDS['counterfactual']}` resumes it.\n\n")
        best = w.get("chosen", {})
        rem, recall = w.get("removal", {}), info.get("top_k_proponent_recall", {})
        rows = []
        for key in [*FAMILY_ORDER[:5], "ceiling", "random"]:
            if key == "ceiling":
                c = w["ceiling"]
                r = c.get("removal") or {}
                rows.append(["**ceiling** (proponent indicator)", "-", _ci(c["lds"]), f2(c.get("mrr"), 3),
                             _ci(r, "loss_increase") if r else "-", f2(r.get("flip_rate")), "1.00"])
                continue
            if key == "random":
                r = rem.get("random")
                if r:
                    rows.append(["random", "-", "-", "-", _ci(r, "loss_increase"), f2(r.get("flip_rate")), "-"])
                continue
            if key not in w["lds"]:
                continue
            r = rem.get(key)
            rows.append([f"**{key}**", best.get(key, key), _ci(w["lds"][key]), f2(w["mrr"].get(key), 3),
                         _ci(r, "loss_increase") if r else "-", f2(r["flip_rate"]) if r else "-",
                         f2(recall.get(key))])
        k = info.get("top_k", 10)
        text += table(["method", "setting chosen on the select half", "held-out LDS [95% CI]", "MRR (known, report)",
                       f"top-{k} removal: loss increase, nats [95% CI]", "flip rate", f"proponents in the top {k}"],
                      rows) + "\n"
        rows = []
        for pair, v in w.get("comparisons", {}).items():
            rows.append([pair, _ci(v["lds"]) if v.get("lds") else "-", _verdict(v.get("lds")),
                         _ci(v["removal"]) if v.get("removal") else "-", _verdict(v.get("removal"))])
        text += "Paired differences on the report half (A - B, mean [95% CI]):\n\n"
        text += table(["A vs B", "LDS difference", "LDS verdict", "removal difference (nats)", "removal verdict"],
                      rows) + "\n"
        parts = w.get("by_part", {})
        if parts:
            text += (f"Which parts carry the fact: the chosen MS-IF setting ({best.get('ms-if')}) summed over one "
                     "layer's or one role's modules (`attribute --modules` restricts the same way):\n\n")
            text += table(["modules", "held-out LDS [95% CI]", "MRR", "sum |part score| / sum |total score|"],
                          [[k, _ci(v["lds"]), f2(v["mrr"], 3), f2(v["score_share"])] for k, v in parts.items()]) + "\n"
        select = info.get("lds_select", {})
        rows = [[key, f2(select.get(key), 3), _ci(v), f2(w["mrr"].get(key), 3)]
                for key, v in sorted(w["lds"].items(), key=lambda kv: _setting_order(kv[0])) if key not in best]
        text += "Every setting (select-half mean LDS: what the choice saw; report half: held out):\n\n"
        text += table(["setting", "select-half LDS", "report-half LDS [95% CI]", "MRR (report)"], rows) + "\n"
    png = out_dir / "counterfactual.png"
    if png.is_file():
        shutil.copyfile(png, doc.parent / png.name)
        text += f"![LDS per setting and answer-loss increase per removal]({png.name})\n"
    return text


def attribute_section(d: dict | None) -> str:
    """``hub-msif attribute --plan`` next to the peak resident memory of a real attribution (one query, 100
    candidates, CPU, a fresh process), and the time it took."""
    text = ATTRIBUTE_HEAD + "\n\n"
    if d is None:
        return text + missing("attribute")
    text += (f"`{command_of('attribute', d)}`; {d['threads']} thread(s). One query (answer given) over the candidates, "
             "MS-IF, `Attributor(..., device=\"cpu\")` in a fresh process; peak = `ru_maxrss`; runtime = a fresh "
             "process that imports the same libraries and loads the tokenizer, which the plan leaves out. "
             "GB = 10^9 bytes.\n\n")
    rows = []
    for name, e in d["pairs"].items():
        m, plan = e["measured"], e["plan"]
        peak, base = m["maxrss_bytes"], e["runtime_maxrss_bytes"]
        ratio = e["plan_over_peak_minus_runtime"]
        size = (lambda n: gb(n) if n >= 1e8 else mb(n))  # noqa: E731
        rows.append([name, e["modules"], f"{m['candidates']} x {m['document_tokens']}", size(plan["weight_bytes"]),
                     size(plan["factor_bytes"]), size(plan["total_bytes"]), size(peak), size(base), f2(e["plan_over_peak"]),
                     f2(ratio), verdict(abs(1 - ratio) if ratio is not None else None, 0.25),
                     f"{m['load_seconds']:.1f}", f"{m['attribute_seconds']:.1f}",
                     f"{e['load_average_before'][0]:.1f} / {e['load_average_after'][0]:.1f}"])
    text += table(["pair", "modules", "candidates x tokens", "plan: weights", "plan: factors", "plan: total",
                   "peak RSS", "runtime RSS", "plan / peak", "plan / (peak - runtime)", "distance from 1",
                   "load s", "attribute s", "load avg (1 min) before / after"], rows)
    return text


def gradindex_section(d: dict | None) -> str:
    """The gradient index (issue 18): recall of exact MS-IF's top 10, MRR of two-stage against exact and
    embedding candidates, bytes, the build's pass against a plain pass, latency at 1M, and scale on paper."""
    text = GRADINDEX_HEAD + "\n\n"
    if d is None:
        return text + missing("gradindex")
    text += (f"`{command_of('gradindex', d)}`; load average {', '.join(f'{x:.1f}' for x in d['machine']['load_average'])} "
             f"at the end of the run ({f2(d['seconds'], 0)} s). Each world's pair is trained and fitted as the demo "
             "does; every pre-training document is indexed at the default compression and every held-out query is "
             "scored exactly against the whole corpus. Recall@10: the share of exact MS-IF's top 10 in the index's "
             "top 100. MRR: 1 / rank of the first proponent (0 when the list misses all): exact whole-corpus MS-IF, "
             "two-stage (the index's top 100 rescored exactly) and embedding candidates (the sentence-embedding "
             "top 100 rescored exactly). Throughput ratio: a plain forward+backward over the documents divided by "
             "the build's pass over them (same model and batches; the fastest of three alternated rounds); "
             "end to end adds loading and writing.\n\n")
    rows = []
    for name, w in d["worlds"].items():
        missed = w["embedding_misses"]
        rows.append([name, w["documents"], w["queries"], f"{w['test_accuracy']:.0%}", f2(w["recall_at_10"]),
                     verdict(w["recall_at_10"], 0.95, higher_is_better=True), f2(w["mrr"]["two-stage"]),
                     f2(w["mrr"]["exact"]), f2(w["mrr"]["embedding"]),
                     f"{missed['queries']}" + (f" (two-stage {f2(missed['two-stage'])}, embedding "
                                              f"{f2(missed['embedding'])})" if missed["queries"] else ""),
                     f2(w["stage_one_vs_exact"]["spearman_mean"]), f2(w["build_ratio_to_fwd_bwd"]),
                     verdict(w["build_ratio_to_fwd_bwd"], 0.8, higher_is_better=True),
                     f2(w["build_ratio_to_fwd_bwd_end_to_end"])])
    text += table(["world", "documents", "queries", "pair's accuracy", "recall@10 in top 100", "target >= 0.95",
                   "MRR two-stage", "MRR exact", "MRR embedding", "queries the embedding misses",
                   "Spearman stage one vs exact", "throughput ratio", "target >= 0.8", "end to end"], rows)
    shaped = d.get("build_pythia_width")
    if shaped:
        text += (f"\nThe build's pass at a real width: {shaped['model']}, random weights and factors, {shaped['documents']} "
                 f"documents x {shaped['tokens']} tokens, batch {shaped['batch_size']}: {f2(shaped['vectors_pass_seconds'])} s "
                 f"against {f2(shaped['plain_pass_seconds'])} s for a plain forward+backward, throughput ratio "
                 f"**{f2(shaped['ratio'])}** ({verdict(shaped['ratio'], 0.8, higher_is_better=True)}). On the tiny worlds "
                 "the hooks' fixed costs weigh more than the models' work.\n")
    sweep = []
    for name, w in d["worlds"].items():
        base = {k: v for k, v in w["projection"].items() if k in ("kind", "dims", "balance")}
        sweep.append([name, f"default {base}", f"{w['bytes_per_document']:.0f}", f2(w["recall_at_10"]),
                      f2(w["mrr"]["two-stage"])])
        sweep += [[name, str(r["settings"]), r["bytes_per_document"], f2(r["recall_at_10"]), f2(r["mrr"]["two-stage"])]
                  for r in w.get("sweep", [])]
    text += "\nOther compressions of the same documents (bytes: float16 vector, float32 norm, int64 row):\n\n"
    text += table(["world", "projection", "bytes per document", "recall@10 in top 100", "MRR two-stage"], sweep)
    rows = []
    for r in d["latency"]:
        for ann in ("flat", "ivf,pq"):
            e = r[ann]
            rows.append([f"{r['documents']:,}", r["dims"], ann, f"{e['build_seconds']:.1f}", f2(e["query_median_ms"], 1),
                         f2(e["query_p90_ms"], 1), f2(e.get("recall_at_top_of_flat")) if ann != "flat" else "1 (reference)",
                         verdict(e["query_median_ms"], 50) if r["documents"] == 1_000_000 else ""])
    text += ("\nOne query's top-100 search over synthetic vectors of the default dimension (`GradientIndex.search`, "
             f"{d['latency'][0]['threads'] if d['latency'] else '?'} faiss thread(s)):\n\n")
    text += table(["documents", "dims", "search", "index built in s", "median ms", "p90 ms", "recall of flat top 100",
                   "target <= 50 ms"], rows)
    rows = [[r["model"], f"{r['parameters'] / 1e9:.2f}B", r["bytes_per_document"],
             f"{r['document_bytes_over_model_bytes']:.1e}", gb(r["pile_index_bytes"]), f"{r['build_hours']:.0f}"]
            for r in d["on_paper"]]
    p = d["on_paper"][0] if d["on_paper"] else {}
    text += (f"\nScale on paper: the Pile ({p.get('pile_documents', 0) / 1e6:.0f}M documents, "
             f"{p.get('pile_tokens', 0) / 1e9:.0f}B tokens) on {p.get('gpus')} GPUs; build FLOPs = 4 x parameters x tokens "
             f"(forward and input-only backward), at {p.get('gpu_utilisation', 0):.0%} of "
             f"{p.get('gpu_peak_flops', 0) / 1e12:.0f} TFLOP/s per GPU (an assumption, not a measurement):\n\n")
    text += table(["model", "parameters", "bytes per document", "document / model (bf16) bytes", "Pile index",
                   "build hours on 8 GPUs"], rows)
    return text


# ``--only NAME``: the sections (by the start of their heading) that NAME rewrites in place.
ONLY = {
    "counterfactual": [COUNTERFACTUAL_HEAD],
    "scale": ["## Scale on paper"],
    "attribute": [ATTRIBUTE_HEAD],
    "gradindex": [GRADINDEX_HEAD],
    "speed": ["## Summary: speed and size", "## Fitting (", "## Scoring (", "## Retrieval latency"],
    "fit_memory": [FIT_MEMORY_HEAD],
}


def replace_section(page: str, head: str, section: str) -> str:
    """``page`` with the section starting at ``head`` (up to the next ``## `` heading) replaced by
    ``section``, or ``section`` appended when the page has none."""
    start = page.find(head)
    if start < 0:
        return page.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    end = page.find("\n## ", start + len(head))
    rest = "" if end < 0 else page[end + 1 :]
    return page[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--only", choices=sorted(ONLY), help="rewrite only these sections of an existing page "
                        "(speed: the summary, fitting, scoring and retrieval sections)")
    args = parser.parse_args(argv)
    out_dir, doc = Path(args.out_dir), Path(args.doc)
    counterfactual = counterfactual_section(load(out_dir, "counterfactual"), load(out_dir, "counterfactual_details"),
                                            out_dir, doc)
    data = {name: load(out_dir, name) for name in COMMANDS}
    sections = {
        "## Summary: speed and size": lambda: summary_section(data),
        "## Fitting (": lambda: fit_section(data["fit_bench"]),
        "## Scoring (": lambda: score_section(data["score_bench"]),
        "## Retrieval latency": lambda: retrieval_section(data["retrieval_bench"]),
        "## Scale on paper": lambda: scale_section(data["scale"]),
        COUNTERFACTUAL_HEAD: lambda: counterfactual,
        ATTRIBUTE_HEAD: lambda: attribute_section(data["attribute"]),
        GRADINDEX_HEAD: lambda: gradindex_section(data["gradindex"]),
        FIT_MEMORY_HEAD: lambda: fit_memory_section(data["fit_memory"]),
    }
    if args.only:
        if not doc.is_file():
            print(f"report: {doc} does not exist; run without --only first", file=sys.stderr)
            return 1
        page = doc.read_text()
        for head in ONLY[args.only]:
            page = replace_section(page, head, sections[head]())
        doc.write_text(page)
        print(f"rewrote the {args.only} section(s) of {doc}")
        return 0
    parts = [
        "# Benchmarks\n\nGenerated by `bench/report.py` from the JSON files in `bench/out/`; do not edit by hand. "
        "Re-run with `make bench` (all benchmarks, then this page) or `.venv/bin/python -m bench.report` (this page only).\n",
        machine_section(data),
        commands_section(data),
        summary_section(data),
        fit_section(data["fit_bench"]),
        fit_memory_section(data["fit_memory"]),
        score_section(data["score_bench"]),
        retrieval_section(data["retrieval_bench"]),
        scale_section(data["scale"]),
        accuracy_section(data["accuracy"]),
        fact_tracing_section(data["fact_tracing"], out_dir, doc),
        fact_tracing_demo_section(data["fact_tracing_demo"]),
        counterfactual,
        attribute_section(data["attribute"]),
        gradindex_section(data["gradindex"]),
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(p.rstrip("\n") + "\n" for p in parts))
    print(f"wrote {doc} ({sum(d is not None for d in data.values())}/{len(data)} JSON files present)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
