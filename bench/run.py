"""casa-kernel benchmarks: every figure a ratio of two things run here, on the same data.

    python bench/run.py [--quick] [--only P1,P2,P3,P4,P5,scale,memory]

Prints one markdown table per section (with the command, cores and date beside
it), writes bench/results.json (sections not run keep their previous results) and
bench/scale.png, and a copy of the tables in bench/out/report.md. Data, logs,
profiles and scratch go to bench/out/ (gitignored); the mpicasa baseline's venv
is bench/.venv-mpicasa (made on first use, never the runtime venv).

Run it with the runtime venv's python (``.venv/bin/python bench/run.py``). The full
run takes ~10 minutes on a 2-core box (plus ~30 s once for the mpicasa venv);
--quick ~3 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH,
    OUT,
    casa_env,
    fmt,
    loadavg,
    log,
    machine_info,
    markdown_table,
    med,
    verdict,
)

SECTIONS = ["P1", "P2", "P3", "P4", "P5", "scale", "memory"]
RESULTS = BENCH / "results.json"

SETTINGS = {
    "full": {
        "p1_repeats": 5,
        "p2_repeats": 40,
        "p3_repeats": 5,
        "p4_mib": 64,
        "p4_repeats": 10,
        "p5_repeats": 3,
        "scale_ns": [2, 8, 32, 64],
        "scale_repeats": 10,
    },
    "quick": {
        "p1_repeats": 1,
        "p2_repeats": 15,
        "p3_repeats": 1,
        "p4_mib": 16,
        "p4_repeats": 3,
        "p5_repeats": 1,
        "scale_ns": [2, 8],
        "scale_repeats": 5,
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small data, fewer repeats, N <= 8")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument(
        "--report-only", action="store_true", help="print tables of bench/results.json"
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"sections": {}}
    if args.report_only:
        print(report(results))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    casa_env()  # before anything imports casatools
    mode = "quick" if args.quick else "full"
    cfg = SETTINGS[mode]
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    if args.only != ",".join(SECTIONS):
        command += f" --only {args.only}"
    machine = machine_info()
    results["machine"] = machine
    log(f"{mode} run of {only} on {machine['nproc']} cores, load {loadavg()}")

    data = None
    if any(s in only for s in ("P1", "P2", "memory")):
        from data import SIZES, prepare

        t0 = time.perf_counter()
        data = prepare(SIZES[mode])
        log(f"data {data.size}: {data.ms_bytes / 1e6:.0f} MB ({time.perf_counter() - t0:.0f} s)")

    failed = []
    for section in only:
        meta = {
            "command": command,
            "mode": mode,
            "date": machine_info()["date"],
            "cores": machine["nproc"],
            "commit": machine["commit"],
            "load_before": loadavg(),
        }
        t0 = time.perf_counter()
        try:
            value = run_section(section, cfg, data)
        except Exception as exc:  # keep the other sections' numbers
            import traceback

            traceback.print_exc()
            failed.append(section)
            value = {"error": f"{type(exc).__name__}: {exc}"}
        if section == "memory" and "error" not in value:
            mc = results["sections"].get("P1", {}).get("systems", {}).get("mpicasa")
            if mc:  # mpicasa's client and servers, measured inside its P1 run
                value["mpicasa"] = {
                    "memory_idle": mc["memory_idle"],
                    "memory_after": mc["memory_after"],
                }
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        meta["load_after"] = loadavg()
        results["sections"][section] = {"meta": meta, **value}
        RESULTS.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
        log(f"{section} done in {meta['seconds']} s")
        print(report_section(section, results["sections"][section]), flush=True)
        print(flush=True)

    text = report(results)
    (OUT / "report.md").write_text(text)
    log(
        "wrote bench/results.json, bench/out/report.md"
        + (", bench/scale.png" if "scale" in only else "")
    )
    return 1 if failed else 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def run_section(section: str, cfg: dict[str, Any], data: Any) -> dict[str, Any]:
    if section == "P1":
        import p1_casa

        return p1_casa.run(data, cfg["p1_repeats"])
    if section == "P2":
        import p2_dispatch

        return p2_dispatch.run(data, cfg["p2_repeats"])
    if section == "P3":
        import p3_start

        return p3_start.run(cfg["p3_repeats"])
    if section == "P4":
        import p4_gather

        return p4_gather.run(cfg["p4_mib"], cfg["p4_repeats"])
    if section == "P5":
        import p5_cold

        return p5_cold.run("small", cfg["p5_repeats"])  # a launch's cost, not the data's
    if section == "scale":
        import scale

        return scale.run(cfg["scale_ns"], cfg["scale_repeats"])
    if section == "memory":
        import memory

        return memory.run(data)
    raise ValueError(section)


# -- tables ----------------------------------------------------------------------------------


def header(section: str, meta: dict[str, Any]) -> str:
    return (
        f"`{meta['command']}` -- {meta['cores']} cores (nproc), {meta['date']}, "
        f"commit {meta.get('commit', '?')}, load average {fmt(meta['load_before'][0])} before / "
        f"{fmt(meta['load_after'][0])} after, section took {meta['seconds']:.0f} s"
    )


def report(results: dict[str, Any]) -> str:
    parts = []
    m = results.get("machine", {})
    if m:
        parts.append(
            f"Machine: {m.get('nproc')} cores ({m.get('cpu')}), {m.get('mem_gib')} GiB, "
            f"Python {m.get('python')}, {json.dumps(m.get('versions', {}))}"
        )
    for section in SECTIONS:
        if section in results.get("sections", {}):
            parts.append(report_section(section, results["sections"][section]))
    return "\n\n".join(parts) + "\n"


def report_section(section: str, r: dict[str, Any]) -> str:
    title = f"### {section}\n\n{header(section, r['meta'])}\n\n"
    if "error" in r:
        return title + f"FAILED: {r['error']}"
    return title + globals()[f"table_{section}"](r)


def ms(x: float) -> float:
    return x * 1e3


def table_P1(r: dict[str, Any]) -> str:
    d = r["data"]
    s = r["systems"]
    rows = []
    for label, q in r["ratios"].items():
        m = q["median_s"]
        rows.append(
            [
                label,
                m["serial"],
                m["limit"],
                m["casa-kernel"],
                m["mpicasa"],
                f"{q['speedup_vs_serial']:.2f}x",
                f"{q['fraction_of_limit_speed'] * 100:.0f} % ({verdict(q['target_limit'])})"
                if q["target_limit"] is not None
                else f"{q['fraction_of_limit_speed'] * 100:.0f} %",
                f"{q['vs_mpicasa']:.2f}x ({verdict(q['target_mpicasa'])})",
            ]
        )
    out = [
        f"Data: simulated `{d['size']}` MS, {d['ms_mb']:.0f} MB, {d['rows']} rows -> Multi-MS of "
        f"{d['submms']} sub-MSs ({d['mms_mb']:.0f} MB); 2 servers; medians of {r['repeats']} "
        "repeat(s), task time only (s).",
        "",
        markdown_table(
            [
                "task",
                "serial",
                "limit (2 plain procs)",
                "casa-kernel",
                "mpicasa",
                "speedup vs serial",
                "casa-kernel speed vs limit (>= 90 %)",
                "casa-kernel / mpicasa (<= 0.7x)",
            ],
            rows,
        ),
    ]
    ck, mc = s["casa-kernel"], s["mpicasa"]
    tasks_ck = sum(med(v) for v in ck["times"].values())
    tasks_mc = sum(med(v) for v in mc["times"].values())
    out += [
        "",
        markdown_table(
            [
                "with start and stop",
                "start (s)",
                "tasks (s)",
                "stop (s)",
                "total (s)",
                "first task call (s)",
            ],
            [
                [
                    "casa-kernel (kernel start -> servers ready; shutdown)",
                    ck["start_s"],
                    tasks_ck,
                    ck["stop_s"],
                    ck["start_s"] + tasks_ck + ck["stop_s"],
                    ck["first_call_s"],
                ],
                [
                    "mpicasa (mpiexec launch -> client ready; stop_services + exit)",
                    mc["start_s"],
                    tasks_mc,
                    mc["stop_s"],
                    mc["total_wall_s"],
                    None,
                ],
            ],
        ),
        "",
        "Flagged fraction after each system's run (same work done?): "
        + ", ".join(f"{k} {fmt(v.get('flagged_fraction'), 4)}" for k, v in s.items()),
    ]
    return "\n".join(out)


def table_P2(r: dict[str, Any]) -> str:
    rt, ins = r["kernel_roundtrip_s"], r["inside_kernel_s"]
    rows = [
        [
            "kernel round trip (jupyter_client execute -> idle)",
            ms(med(rt["casa_parallel"])),
            ms(med(rt["apply_sync"])),
            f"{r['ratio_casa_parallel_vs_apply_sync']:.2f}x ({verdict(r['target'])})",
        ],
        [
            "inside the kernel (no Jupyter messaging)",
            ms(med(ins["casa_parallel"])),
            ms(med(ins["apply_sync"])),
            f"{r['ratio_inside_kernel']:.2f}x",
        ],
    ]
    if "per_submms" in rt:
        rows.append(
            [
                "kernel round trip, `--vis` 4 sub-MSs vs `LoadBalancedView.map` x4",
                ms(med(rt["per_submms"])),
                ms(med(rt["lview_map"])),
                f"{r['ratio_per_submms_vs_lview_map']:.2f}x",
            ]
        )
    rows.append(
        [
            "inside the kernel, per-sub-MS x4 vs `LoadBalancedView.map` x4",
            ms(med(ins["per_submms"])),
            ms(med(ins["lview_map"])),
            f"{r['ratio_inside_kernel_per_submms']:.2f}x",
        ]
    )
    floors = [
        [
            "raw ipyparallel from a plain script: `apply_sync(noop)`",
            ms(med(r["plain_script_s"]["apply_sync"])),
        ],
        [
            "raw ipyparallel from a plain script: `LoadBalancedView.map` x4",
            ms(med(r["plain_script_s"]["lview_map"])),
        ],
        ["raw mpi4py bcast + gather, 3 ranks", ms(med(r["mpi4py_roundtrip_s"]))],
    ]
    return (
        f"No-op to both servers (2 servers), medians of {r['repeats']} interleaved repeats, ms.\n\n"
        + markdown_table(
            ["what", "casa-kernel (ms)", "raw ipyparallel (ms)", "ratio (<= 1.1x)"], rows
        )
        + "\n\nFloors (ms):\n\n"
        + markdown_table(["floor", "ms"], floors)
    )


def table_P3(r: dict[str, Any]) -> str:
    ck = r["casa_kernel"]
    rows = [
        [
            "casa-kernel: kernel start -> all servers ready (`%casa_cluster status` replied)",
            med(ck["servers_ready_s"]),
            "1.00",
        ],
        ["casa-kernel: kernel start -> kernel_info reply", med(ck["kernel_ready_s"]), ""],
        ["plain ipykernel: start -> kernel_info reply", med(r["plain_ipykernel"]["ready_s"]), ""],
        [
            "`ipcluster start -n 2 --engines=mpi` (defaults) -> first no-op on 2 engines returned",
            med([x["ready_s"] for x in r["ipcluster_default"]]),
            f"{r['ratio_vs_ipcluster_default']:.2f}x ({verdict(r['target'])})",
        ],
        [
            "  same, until the 2 engines registered",
            med([x.get("registered_s", float("nan")) for x in r["ipcluster_default"]]),
            "",
        ],
        [
            "`ipcluster start` tuned as casa-kernel (500 ms heartbeat, delay 0) -> first no-op",
            med([x["ready_s"] for x in r["ipcluster_tuned"]]),
            f"{r['ratio_vs_ipcluster_tuned']:.2f}x ({verdict(r['target_tuned'])})",
        ],
        [
            "  same, until the 2 engines registered",
            med([x.get("registered_s", float("nan")) for x in r["ipcluster_tuned"]]),
            "",
        ],
        [
            "floor: `mpiexec -n 2 python -c 'from mpi4py import MPI'`",
            med(r["mpiexec_floor_n2_s"]),
            f"{r['ratio_vs_floor']:.2f}x",
        ],
        [
            "floor: `mpiexec -n 3 python -c 'from mpi4py import MPI'`",
            med(r["mpiexec_floor_n3_s"]),
            "",
        ],
        ["casa-kernel shutdown (kernel + cluster)", med(ck["shutdown_s"]), ""],
    ]
    timeline = r.get("timeline_s", {})
    tl = ", ".join(f"{k} {v:.2f} s" for k, v in timeline.items())
    return (
        f"2 servers; medians of {r['repeats']} start(s), s. "
        "Ratio = casa-kernel / that row (target <= 1.0x).\n\n"
        + markdown_table(["what", "s", "casa-kernel / this"], rows)
        + (
            f"\n\nWhere casa-kernel's cluster start goes (in-process, one start): {tl}"
            if tl
            else ""
        )
    )


def table_P4(r: dict[str, Any]) -> str:
    rate = r["mb_per_s"]
    rows = [
        [
            "casa-kernel `Dispatcher.spmd` (what `%%casa_parallel` returns)",
            rate["casa_kernel"],
            f"{r['fraction_of_memcpy'] * 100:.0f} % ({verdict(r['target'])})",
        ],
        [
            "raw ipyparallel `DirectView.pull`",
            rate["ipp_pull"],
            f"{rate['ipp_pull'] / rate['memcpy'] * 100:.0f} %",
        ],
        [
            "raw mpi4py `Gatherv` among ranks",
            rate["mpi_gatherv"],
            f"{rate['mpi_gatherv'] / rate['memcpy'] * 100:.0f} %",
        ],
        ["local memcpy (`np.copyto`, preallocated)", rate["memcpy"], "100 %"],
        [
            "local allocate + copy (`arr.copy()`)",
            rate["alloc_copy"],
            f"{rate['alloc_copy'] / rate['memcpy'] * 100:.0f} %",
        ],
    ]
    return (
        f"2 servers x {r['mib_per_server']:g} MiB float64 = "
        f"{r['bytes_total'] / 1e6:.0f} MB per gather; "
        f"medians of {r['repeats']} repeats.\n\n"
        + markdown_table(["path", "MB/s", "of memcpy (>= 50 %)"], rows)
    )


def table_P5(r: dict[str, Any]) -> str:
    import p5_cold

    return p5_cold.report(r)


def table_scale(r: dict[str, Any]) -> str:
    rows = []
    for row in r["rows"]:
        ck, raw = row["casa_kernel"], row["raw_ipp"]
        cp = med(ck["dispatch_s"]["casa_parallel"])
        ap = med(ck["dispatch_s"]["apply_sync"])
        rows.append(
            [
                row["n"],
                ck["start_s"],
                f"{raw['start_s']:.2f} ({raw.get('registered_s', float('nan')):.2f})",
                row["mpiexec_floor_s"],
                f"{ck['start_s'] / raw['start_s']:.2f}x",
                ms(cp),
                ms(ap),
                ms(med(raw["dispatch_s"]["apply_sync"])),
                ms(row["mpi4py_roundtrip_s"]),
                f"{cp / ap:.2f}x",
                ck["stop_s"],
            ]
        )
    g = r["growth_exponent"]
    growth = ", ".join(f"{k} {fmt(v)}" for k, v in g.items())
    return (
        f"Medians of {r['repeats']} no-op dispatches per N; start is one start per N. "
        "![scale](bench/scale.png)\n\n"
        + markdown_table(
            [
                "N servers",
                "start casa-kernel (s)",
                "start raw ipp (s; registered)",
                "mpiexec floor (s)",
                "start ratio",
                "%%casa_parallel (ms)",
                "apply_sync same cluster (ms)",
                "apply_sync raw cluster (ms)",
                "mpi4py bcast+gather (ms)",
                "dispatch ratio",
                "stop casa-kernel (s)",
            ],
            rows,
        )
        + f"\n\nGrowth exponent between the two largest N (log-log slope; 1 = linear): {growth}"
    )


def table_memory(r: dict[str, Any]) -> str:
    def hwm(x: dict[str, float] | None) -> float | None:
        return None if not x else x.get("VmHWM")

    idle, after = r["casa_kernel_idle"], r.get("casa_kernel_after_casa")
    rows = [
        [
            "casa-kernel kernel, idle (cluster up)",
            hwm(idle["kernel"]),
            hwm(after["kernel"]) if after else None,
        ],
        [
            "casa-kernel server, idle",
            max(hwm(s) or 0 for s in idle["servers"]),
            max(hwm(s) or 0 for s in after["servers"]) if after else None,
        ],
        ["plain ipykernel, idle", hwm(r["plain_ipykernel_idle"]), None],
        [
            "raw ipyparallel MPI engine, idle",
            max(hwm(s) or 0 for s in r["raw_ipp_engine_idle"]),
            None,
        ],
    ]
    p1 = r.get("mpicasa")
    if p1:
        rows += [
            [
                "mpicasa client (rank 0)",
                hwm(p1["memory_idle"]["client"]),
                hwm(p1["memory_after"]["client"]),
            ],
            [
                "mpicasa server",
                max(hwm(s) or 0 for s in p1["memory_idle"]["servers"]),
                max(hwm(s) or 0 for s in p1["memory_after"]["servers"]),
            ],
        ]
    return "Peak RSS (VmHWM, MiB); servers: the largest of the 2.\n\n" + markdown_table(
        ["process", "idle", "after CASA work (unflag, rflag, summary / P1)"], rows
    )


if __name__ == "__main__":
    sys.exit(main())
