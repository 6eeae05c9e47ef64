"""Printing the plan of ``ssl train --dry-run`` (tables, or one JSON object)."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.table import Table

from sslcli.cli.console import err, out


def show(plan: dict[str, Any], *, as_json: bool = False) -> None:
    mem = plan.get("memory") or {}
    from sslcli import api

    warning = api.memory_warning(mem) if mem else None
    if as_json:
        out.out(json.dumps(plan, default=str), highlight=False)
        if warning:
            err.print(f"warning: {warning}", highlight=False)
        return
    d, b, sch, t, lr = plan["data"], plan["backbone"], plan["schedule"], plan["trainer"], plan["lr"]
    out.print(f"dry run of ssl train {plan['method']['name']}: nothing is trained or written")
    if d.get("note"):
        out.print(f"note: {d['note']}")

    rows = Table(title="settings (not at a default)", title_justify="left")
    for col in ("setting", "value", "from"):
        rows.add_column(col)
    for s in plan["settings"]:
        if s["from"] != "default":
            rows.add_row(s["key"], json.dumps(s["value"]), s["from"])
    out.print(rows)

    run = Table(title="run", title_justify="left", show_header=False)
    run.add_column("what")
    run.add_column("value")
    data = d["opened"] or "(not opened)"
    run.add_row("data", f"{data}: {d['images']:,} images"
                + (f", {d['classes']} classes" if d["classes"] else "")
                + f"; views of {d['image_size']} px decoded at {d['load_size']} px;"
                f" {d['num_workers']} workers")  # fmt: skip
    run.add_row("batch", f"{t['global_batch']} global = {t['processes']} process(es) x "
                f"{t['batch_per_process']}; {d['steps_per_epoch']} steps/epoch "
                f"({d['images_dropped_per_epoch']} images left out per epoch)")  # fmt: skip
    run.add_row("device", f"{t['device']}, {t['precision']}, channels_last {t['channels_last']},"
                f" compile {t['compile']}, sync_bn {t['sync_bn']},"
                f" grad_checkpointing {t['grad_checkpointing']}")  # fmt: skip
    views = ", ".join(
        f"{v['count']}x{v['size']} px (scale {v['scale'][0]:g}-{v['scale'][1]:g}, blur "
        f"{v['blur_p']:g}, solarize {v['solarize_p']:g})"
        for v in plan["views"]
    )
    run.add_row("views", views)
    run.add_row("run directory", f"{t['run_dir']} (not created)")
    if t.get("resume_from_step") is not None:
        run.add_row("resume", f"from step {t['resume_from_step']}")
    out.print(run)

    bb = Table(title="backbone", title_justify="left", show_header=False)
    bb.add_column("what")
    bb.add_column("value")
    for call in b["create_model_calls"]:
        args = ", ".join(f"{k}={v!r}" for k, v in call["kwargs"].items())
        bb.add_row("timm.create_model", f"{call['model_name']!r}, {args}")
    if b.get("small_stem"):
        bb.add_row("stem", "small-image stem (3x3 stride-1 conv, no max-pool)")
    facts = {k: v for k, v in b.items()
             if k not in ("name", "timm_name", "create_model_calls", "small_stem")}  # fmt: skip
    bb.add_row("built", ", ".join(f"{k} {v}" for k, v in facts.items()))
    out.print(bb)

    p = plan["parameters"]
    pt = Table(title="parameters", title_justify="left")
    for col in ("part", "total", "trainable", "frozen"):
        pt.add_column(col, justify="left" if col == "part" else "right")
    for part, r in p["by_part"].items():
        pt.add_row(part, human_count(r["total"]), human_count(r["trainable"]),
                   human_count(r["frozen"]))  # fmt: skip
    pt.add_row("all", human_count(p["total"]), human_count(p["trainable"]),
               human_count(p["frozen"]))  # fmt: skip
    out.print(pt)
    if p["frozen_tensors"]:
        out.print("frozen: " + ", ".join(
            f"{f['name']} ({human_count(f['params'])})" for f in p["frozen_tensors"]))  # fmt: skip

    o = plan["optimizer"]
    hyper = ", ".join(f"{k} {v}" for k, v in o.items() if k not in ("name", "groups"))
    ot = Table(title=f"optimiser {o['name']} ({hyper})", title_justify="left")
    for col in ("group", "tensors", "params", "lr", "weight decay", "lr scheduled"):
        ot.add_column(col)
    for g in o["groups"]:
        sched = "no (fixed)" if g["fixed_lr"] else "yes"
        ot.add_row(g["name"], str(g["tensors"]), human_count(g["params"]), fmt_float(g["lr"]),
                   fmt_float(g["weight_decay"]), sched)  # fmt: skip
    out.print(ot)
    out.print(f"lr: {lr['rule']} = {fmt_float(lr['scaled'])} (optim.lr_scaling={lr['scaling']})")
    line = (
        f"schedule: {sch['kind']}, {sch['epochs']} epochs = {sch['total_steps']:,} steps; "
        f"warm-up {sch['warmup_steps']:,} steps = {sch['warmup_epochs']:g} epochs"
    )
    if sch["warmup_epochs_set"] is not None:
        line += f" (schedule.warmup_epochs = {sch['warmup_epochs_set']:g})"
    if sch["milestones_epochs"]:
        line += "; decays at epochs " + ", ".join(f"{m:g}" for m in sch["milestones_epochs"])
        line += f" (steps {', '.join(str(m) for m in sch['milestones_steps'])}) x{sch['gamma']:g}"
    first, last = fmt_float(sch["lr_first_step"]), fmt_float(sch["lr_last_step"])
    line += f"; lr first step {first}, last {last}"
    if sch["stop_step"] != sch["total_steps"]:
        line += f"; stops at step {sch['stop_step']} (trainer.max_steps)"
    out.print(line)

    if mem:
        mt = Table(title=f"estimated peak memory per process ({mem['per_process_batch']} images, "
                   f"{mem['precision']})", title_justify="left", show_header=False)  # fmt: skip
        mt.add_column("part")
        mt.add_column("size", justify="right")
        for k in ("weights_and_buffers", "gradients", "optimizer_state", "views", "activations"):
            mt.add_row(k.replace("_", " "), human_bytes(mem[k]))
        mt.add_row("total", human_bytes(mem["total"]))
        out.print(mt)
        out.print(f"how: {mem['method']}")
        if mem.get("device_memory"):
            out.print(f"device: {mem['device_name']}, {human_bytes(mem['device_memory'])}")
        else:
            out.print("device: CPU run; this is an estimate only (no device limit to check)")
        if warning:
            out.print(f"warning: {warning}")


GIB = 2**30


def human_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def human_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{int(n)}"


def fmt_float(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or (1e-3 <= abs(x) < 1e4):
        return f"{x:.6g}"
    return f"{x:.3e}" if not math.isinf(x) else str(x)
