"""``--load``: converting a random bf16 Hugging Face checkpoint on disk to a
quantized folder, ``mlx_moe.convert.convert`` against ``mlx_lm.convert.convert``,
each in a fresh subprocess (clean RSS) with the source dropped from the page
cache first. The subprocess is ``python -m mlx_moe.bench _load_child ...``
(:func:`load_child`)."""

import contextlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .common import GB, drop_page_cache, proc_status

# The hidden subcommand of ``python -m mlx_moe.bench`` that runs load_child.
CHILD_COMMAND = "_load_child"


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak that
    follows belongs to the conversion, not to the imports before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_child(impl, src, dst, bits, group, out_json):
    """Runs in a fresh interpreter: convert ``src`` to ``dst`` and report."""
    bits, group = int(bits), int(group)
    if impl == "ours":
        from ..convert import convert

        run = lambda: convert(src, dst, quantize={"bits": bits, "group_size": group}, progress=False)
    else:
        from mlx_lm.convert import convert

        run = lambda: convert(src, dst, quantize=True, q_group_size=group, q_bits=bits)
    rss0 = proc_status("VmRSS") or _maxrss_bytes()
    reset = _reset_peak_rss()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run()
    wall = time.perf_counter() - t0
    hwm = proc_status("VmHWM") if reset else None
    Path(out_json).write_text(json.dumps({
        "wall_s": wall,
        # Peak RSS while converting: the high-water mark reset just before the
        # call where the kernel allows it, else the process's max RSS.
        "peak_rss_bytes": hwm or _maxrss_bytes(),
        "peak_rss_method": "VmHWM reset before convert" if hwm else "getrusage ru_maxrss (whole process)",
        "process_max_rss_bytes": _maxrss_bytes(),
        "rss_before_bytes": rss0,
        "mlx_peak_bytes": mx.get_peak_memory(),
    }))


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _same_outputs(a: Path, b: Path) -> Optional[bool]:
    """Whether two converted folders hold the same tensors (names and values)."""
    ta, tb = {}, {}
    for f in Path(a).glob("*.safetensors"):
        ta.update(mx.load(str(f)))
    for f in Path(b).glob("*.safetensors"):
        tb.update(mx.load(str(f)))
    if set(ta) != set(tb):
        return False
    for k in ta:
        if ta[k].shape != tb[k].shape or not mx.array_equal(ta[k], tb[k]).item():
            return False
    return True


def bench_load(args, log) -> dict:
    from ..synthetic import load_config_for_gb, write_random_checkpoint

    bits = args.bits[0] if args.bits and args.bits[0] else 4
    group = args.group_size
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mlx_moe_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    config = getattr(args, "load_config", None) or load_config_for_gb(args.load_gb)
    try:
        shutil.rmtree(src, ignore_errors=True)
        log(f"[load] writing a ~{args.load_gb:g} GB bf16 checkpoint to {src}")
        t0 = time.perf_counter()
        write_random_checkpoint(src, config, seed=args.seed, max_shard_gb=max(0.1, args.load_gb / 4))
        write_s = time.perf_counter() - t0
        files = sorted(src.glob("*.safetensors"))
        src_bytes = sum(f.stat().st_size for f in files)
        out = {"source_gb": src_bytes / GB, "source_files": len(files), "write_s": write_s, "bits": bits,
               "group_size": group, "config": {k: config.get(k) for k in ("model_type", "num_hidden_layers", "num_experts", "hidden_size", "moe_intermediate_size")},
               "impls": {}}
        dsts = {}
        for impl in ("ours", "mlx-lm"):
            dst = work / f"dst-{impl}"
            shutil.rmtree(dst, ignore_errors=True)
            dropped = drop_page_cache(files)
            res_file = work / f"{impl}.json"
            cmd = [sys.executable, "-m", "mlx_moe.bench", CHILD_COMMAND, impl, str(src), str(dst), str(bits), str(group), str(res_file)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            outer = time.perf_counter() - t0
            if p.returncode != 0:
                raise RuntimeError(f"{impl} conversion failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            r = json.loads(res_file.read_text())
            qbytes = _safetensors_bytes(dst)
            out["impls"][impl] = {
                "wall_s": r["wall_s"],
                "process_s": outer,
                "source_gbs": src_bytes / r["wall_s"] / GB,
                "peak_rss_gb": r["peak_rss_bytes"] / GB,
                "peak_rss_method": r["peak_rss_method"],
                "process_max_rss_gb": r["process_max_rss_bytes"] / GB,
                "rss_before_convert_gb": r["rss_before_bytes"] / GB,
                "mlx_peak_gb": r["mlx_peak_bytes"] / GB,
                "quantized_gb": qbytes / GB,
                "peak_rss_over_quantized": r["peak_rss_bytes"] / qbytes,
                "page_cache_dropped": dropped,
            }
            dsts[impl] = dst
            log(f"[load] {impl}: {r['wall_s']:.2f} s, {src_bytes / r['wall_s'] / GB:.2f} GB/s, peak RSS {r['peak_rss_bytes'] / GB:.2f} GB")
        o, l = out["impls"]["ours"], out["impls"]["mlx-lm"]
        o["speedup_vs_mlx_lm"] = {"wall": l["wall_s"] / o["wall_s"], "peak_rss": l["peak_rss_gb"] / o["peak_rss_gb"]}
        try:
            out["outputs_identical"] = _same_outputs(dsts["ours"], dsts["mlx-lm"])
        except Exception as e:
            out["outputs_identical"] = None
            out["outputs_compare_error"] = f"{type(e).__name__}: {e}"
        out["definitions"] = {
            "wall_s": "time of the convert() call in a fresh subprocess (imports excluded)",
            "source_gbs": "source safetensors bytes / wall_s (source dropped from the page cache first)",
            "peak_rss_gb": "the child's RSS high-water mark during convert() (Linux: VmHWM reset just before the call, so it includes the ~0.3-0.5 GB of interpreter and imports resident then, see rss_before_convert_gb; elsewhere getrusage max RSS of the whole child)",
            "mlx_peak_gb": "mx.get_peak_memory() during convert() (MLX allocations only)",
            "peak_rss_over_quantized": "peak RSS / bytes of the quantized safetensors written",
            "speedup_vs_mlx_lm": "wall: mlx-lm time / ours; peak_rss: mlx-lm RSS / ours",
        }
        return out
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def format_load(res) -> str:
    if "impls" not in res:
        return f"load: {res.get('skipped', res)}"
    lines = [f"{'impl':<8}{'wall s':>9}{'src GB/s':>10}{'peak RSS GB':>13}{'RSS/quant':>11}{'MLX peak GB':>13}{'out GB':>8}{'×mlx-lm':>9}"]
    for k, v in res["impls"].items():
        sp = v.get("speedup_vs_mlx_lm", {}).get("wall")
        lines.append(f"{k:<8}{v['wall_s']:>9.2f}{v['source_gbs']:>10.2f}{v['peak_rss_gb']:>13.2f}"
                     f"{v['peak_rss_over_quantized']:>11.2f}{v['mlx_peak_gb']:>13.3f}{v['quantized_gb']:>8.3f}"
                     + (f"{sp:>9.2f}" if sp else f"{'1':>9}"))
    lines.append(f"source {res['source_gb']:.2f} GB bf16 in {res['source_files']} files; q{res['bits']} g{res['group_size']}; "
                 f"outputs identical: {res.get('outputs_identical')}")
    return "\n".join(lines)


