"""The printed table and the headline figures of ``benchmarks/speed.py`` (see docs/performance.md)."""

from __future__ import annotations

from typing import Any

from racnn.training.phases import ATTEND, CLASSIFY


def summary(res: dict[str, Any]) -> dict[str, float | None]:
    """The headline figures (``None`` where a section did not run); ``train_ratio`` and ``memory_ratio`` are
    the classification phase's, ``*_attend`` the attention phase's."""
    train, mem, crop = res.get("train", {}), res.get("memory", {}), res.get("crop", {})
    rates = [v["racnn_img_s"] for k, v in train.items() if k != "samples_s"]
    phases = ((CLASSIFY.name, ""), (ATTEND.name, "_attend"))
    head = {f"train_ratio{x}": train.get(ph, {}).get("ratio") for ph, x in phases}
    head |= {"infer_ratio": res.get("infer", {}).get("ratio"), "crop_speedup": crop.get("speedup")}
    head |= {"crop_speedup_image_grad": crop.get("speedup_image_grad")}
    head |= {"crop_speedup_compiled": crop.get("speedup_compiled")}  # None unless --compile-crop
    head |= {f"memory_ratio{x}": mem.get(ph, {}).get("ratio") for ph, x in phases}
    rate = max(rates) if rates else None  # the faster phase: the higher consumption
    loader = res.get("loader", {}).get("images_per_s")
    ratio = loader / rate if rate and loader else None
    return head | {"train_images_per_s": rate, "loader_images_per_s": loader, "loader_over_train": ratio}


def report(res: dict[str, Any]) -> None:
    """Print the figures as a table."""
    print(f"config: {res['config']}\nmachine: {res['machine']}\n{'':<36}{'RA-CNN':>12}{'limit':>12}  ratio")
    rows = [(f"train step ({k})", v) for k, v in res.get("train", {}).items() if k != "samples_s"]
    for name, r in rows + ([("inference", res["infer"])] if "infer" in res else []):
        print(f"  {name:<34}{r['racnn_s'] * 1e3:>9.1f} ms{r['limit_s'] * 1e3:>9.1f} ms  {r['ratio']:.3f}")
    m, impl = res.get("crop", {}).get("median_s", {}), res.get("crop", {}).get("compiled_impl", "compiled")
    for case, label in (("box", "box grad"), ("img", "box+image grad")) if m else ():
        ref = m[f"reference_{case}"]
        for kind, name in (("ours", label), ("compiled", f"{label}, {impl}")):
            if f"{kind}_{case}" in m:
                t = m[f"{kind}_{case}"]
                print(
                    f"  {'crop, ' + name:<34}{t * 1e3:>9.2f} ms{ref * 1e3:>9.2f} ms  ref/ours {ref / t:.1f}"
                )
    if m:
        g, f = m["gather_box"] * 1e3, m["ours_nograd"] * 1e3
        print(f"  crop: previous (gather) {g:.1f} ms; ours forward only, no grad {f:.1f} ms")
    for ph, r in res.get("memory", {}).items():
        gib = [r[v]["peak_bytes"] / 2**30 for v in ("racnn", "limit")]
        print(f"  peak memory ({ph}): {gib[0]:.2f} GiB vs limit {gib[1]:.2f} GiB, ratio {r['ratio']:.3f}")
    if "loader" in res:
        print(f"  loader: {res['loader']['images_per_s']:.1f} img/s with {res['loader']['workers']} workers")
    items = res["summary"].items()
    print("summary:", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in items))
