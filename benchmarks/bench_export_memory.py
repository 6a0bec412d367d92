"""Peak memory of `eqakit export` on a random-weight Qwen3-VL-2B (full architecture, bf16) with a LoRA adapter.

    .venv/bin/python benchmarks/bench_export_memory.py [--config benchmarks/configs/qwen3-vl-2b-instruct.config.json]
        [--workdir DIR] [--skip-naive] [--keep]

Builds, in a child process, a model of the real 2B shape (random weights, bf16, one 4.3 GB
model.safetensors like the published checkpoint; built on the meta device and materialised once) and
a random LoRA adapter (r=8, the language model's q/k/v/o/gate/up/down projections). Then it runs, each
in a fresh child process whose peak RSS the kernel reports (wait4's ru_maxrss):

- eqakit: `eqakit export configs/merge_openeqa.yaml` (paths overridden, export_device=cpu);
- naive: the way a user would write it: load the base in fp32, PeftModel + merge_and_unload, cast to
  bf16, save_pretrained with the same shard size.

Prints each one's peak RSS, its ratio to the model's bytes (target for eqakit: <= 1.3x) and wall
time, with the split of RSS at its sampled peak into anonymous memory and file pages (the mmap'd
checkpoint), beside a child that only imports eqakit.export (the interpreter's share), and checks that both write the same weights: at most one bf16 rounding apart (in practice identical:
PEFT computes B @ A in fp32 and the in-place add into the bf16 weight rounds once, as the fp32 merge
does). Uses about 13 GB of disk under --workdir (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "benchmarks" / "configs" / "qwen3-vl-2b-instruct.config.json"
MERGE_CONFIG = REPO / "configs" / "merge_openeqa.yaml"
LM_PROJECTIONS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
SHARD_GB = 2  # merge_openeqa.yaml's export_size


def build(config_path: Path, base: Path, adapter: Path) -> None:
    """Child process: the random bf16 base (with the tiny model's processor files) and a random adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from eqakit.model.tiny import build_tiny_model

    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # the only allocation: 4.3 GB of bf16
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    model.save_pretrained(base)
    tiny = build_tiny_model(base.parent / "tiny")  # a real Qwen3-VL processor (tokenizer, template)
    for path in tiny.iterdir():
        if path.name not in {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "eqakit_tiny_model.json",
        }:
            shutil.copy2(path, base / path.name)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LM_PROJECTIONS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)


def naive(base: Path, adapter: Path, out: Path) -> None:
    """Child process: the straightforward merge (fp32 load, PEFT merge, cast, save)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=f"{SHARD_GB}GB")


def measure(argv: list[str]) -> dict:
    """Run a child; its exact peak RSS (wait4), wall time, and RSS split at the highest sample."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO)
    samples: list[tuple[int, int, int]] = []

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while True:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            except (OSError, ValueError):
                return
            if "RssAnon" not in fields:
                return
            kb = [int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")]
            samples.append((kb[0], kb[1], kb[2]))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with exit code {proc.returncode}")
    top = max(samples, default=(0, 0, 0))
    return {
        "peak_rss": usage.ru_maxrss * 1024,
        "sampled_anon": top[1] * 1024,
        "sampled_file": top[2] * 1024,
        "seconds": seconds,
    }


def compare(first: Path, second: Path) -> dict:
    """Largest difference between two exports' tensors, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: directory / v for k, v in weight_map.items()}
        with safe_open(directory / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), directory / "model.safetensors")

    a, b = tensors(first), tensors(second)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    worst_ulps, differing, total = 0.0, 0, 0
    for key in sorted(a):
        with safe_open(a[key], "pt") as fa, safe_open(b[key], "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        assert x.dtype == y.dtype == torch.bfloat16 and x.shape == y.shape, key
        total += x.numel()
        if torch.equal(x, y):
            continue
        diff = (x.float() - y.float()).abs()
        _, exponent = torch.frexp(x.float())
        spacing = torch.ldexp(torch.ones_like(diff), exponent - 8)  # bf16 keeps 8 significant bits
        worst_ulps = max(worst_ulps, float((diff / spacing).max()))
        differing += int((diff > 0).sum())
    return {"tensors": len(a), "worst_bf16_ulps": worst_ulps, "differing_fraction": differing / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Qwen3-VL config.json to build")
    parser.add_argument("--workdir", type=Path, help="where models are written (default: a temporary dir)")
    parser.add_argument("--skip-naive", action="store_true", help="measure only eqakit's export")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (always kept: --workdir)"
    )
    parser.add_argument("--stage", choices=("build", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "build":
        return build(*args.paths)
    if args.stage == "naive":
        return naive(*args.paths)

    keep = args.keep or args.workdir is not None  # never delete a directory the user named
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eqakit-bench-export-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, adapter = workdir / "base", workdir / "adapter"
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        if not (base / "model.safetensors").is_file():
            print(f"building a random bf16 model from {args.config} in {base} ...", flush=True)
            built = measure([*me, "--stage", "build", str(args.config), str(base), str(adapter)])
            print(f"  built in {built['seconds']:.0f} s", flush=True)
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        # What the interpreter with torch, transformers and peft imported holds before any weight.
        results = {"imports only": measure([sys.executable, "-c", "import eqakit.export"])}
        out = workdir / "eqakit"
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"model_name_or_path={base}", f"adapter_name_or_path={adapter}", f"export_dir={out}"]
        code = "import sys; from eqakit.export import cli; raise SystemExit(cli(sys.argv[1:]))"
        print("eqakit export ...", flush=True)
        results["eqakit export"] = measure(
            [sys.executable, "-c", code, str(MERGE_CONFIG), *overrides, "export_device=cpu"]
        )
        if not args.skip_naive:
            naive_out = workdir / "naive"
            shutil.rmtree(naive_out, ignore_errors=True)
            print("naive merge (fp32 load + PEFT merge_and_unload + save_pretrained) ...", flush=True)
            results["naive fp32 merge"] = measure(
                [*me, "--stage", "naive", str(base), str(adapter), str(naive_out)]
            )
            agreement = compare(out, naive_out)

        print(
            f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
        )
        print(
            f"model: {args.config.name}, bf16, {model_bytes / 1e9:.2f} GB of weights; LoRA r=8 on LM projections"
        )
        print(f"{'':<18} {'peak RSS':>9} {'x model':>8} {'anon':>7} {'file':>7} {'time':>7}")
        for name, r in results.items():
            print(
                f"{name:<18} {r['peak_rss'] / 1e9:>7.2f}GB {r['peak_rss'] / model_bytes:>7.2f}x "
                f"{r['sampled_anon'] / 1e9:>6.2f}G {r['sampled_file'] / 1e9:>6.2f}G {r['seconds']:>6.1f}s"
            )
        if not args.skip_naive:
            print(
                f"outputs agree: {agreement['tensors']} tensors, {agreement['differing_fraction']:.4%} of values "
                f"differ, at most {agreement['worst_bf16_ulps']:.2f} bf16 ulp apart"
            )
            if agreement["worst_bf16_ulps"] > 1:
                raise SystemExit(
                    "eqakit's merged weights differ from the naive merge by more than one bf16 rounding"
                )
        ratio = results["eqakit export"]["peak_rss"] / model_bytes
        print(
            f"eqakit peak RSS / model size: {ratio:.2f}x (target <= 1.3x): {'met' if ratio <= 1.3 else 'NOT met'}"
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
