"""Preflight of benchmarks/gpu_check.sh: stop at once, in one line, when the GPU machine lacks something.

A device call costs minutes of a short budget; a missing package found by the third benchmark wastes
them all. This runs first there and checks, in this order, stopping at the first phase that fails:

1. versions: every distribution eqakit depends on (pyproject.toml's ``dependencies``, and what each
   of those requires in turn, markers and extras evaluated) is installed in a version its requirer
   accepts; plus pytest for the exactness tests. A gap counts when eqakit or a carried wheel
   (``--carried``: where gpu_check.sh installed .whl) requires it; one between two of the image's
   own packages is the image's affair (pip installed them together) and only noted;
2. imports: each direct dependency's module and the eqakit modules the check runs;
3. the device: ``torch.cuda.is_available()`` (with ``--device cuda``, the default).

On success it prints one line (versions, GPU, whether flash-attn is installed) and exits 0; on a
failure one line ``preflight failed: ...`` naming every gap of that phase, and exits 1.

    python3 benchmarks/gpu_preflight.py                  # on the GPU machine (gpu_check.sh runs it)
    python3 benchmarks/gpu_preflight.py --device cpu     # here: everything but the GPU
    python3 benchmarks/gpu_preflight.py --wheels .whl    # here: do the carried wheels and the image
                                                         # (gpu_image.txt) cover eqakit? (gpu_wheels.sh)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import platform
import sys
import zipfile
from collections import deque
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the GPU machine has 3.12, this repo's venv 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).resolve().parent / "gpu_image.txt"
# Dependencies gpu_check.sh never exercises: a gap there is reported, never a stop.
NOT_EXERCISED = {"av": "PyAV decodes videos; the GPU check has none"}
# Beyond eqakit's own dependencies: what the check itself runs.
EXTRA = ("pytest>=8",)
# eqakit's modules the check imports (each pulls in most of the rest).
MODULES = (
    "eqakit.train.sft",
    "eqakit.evaluate.predict",
    "eqakit.engine",
    "eqakit.memory",
    "eqakit.config.check",
)
# The GPU machine's interpreter, for the markers of the wheels checked here (--wheels).
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


class Failed(Exception):
    """One phase's gaps, joined into the single line the caller prints."""


def project() -> tuple[list[Requirement], SpecifierSet]:
    """pyproject.toml's dependencies and requires-python."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in data["dependencies"]], SpecifierSet(data["requires-python"])


def applies(req: Requirement, extras: set[str], env: dict[str, str] | None = None) -> bool:
    """Whether a requirement's marker holds (for the requirer's extras, or none)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**(env or {}), "extra": extra}) for extra in {"", *extras})


def carried(name: str, folders: list[Path]) -> bool:
    """Whether the installed distribution ``name`` comes from one of ``folders`` (the carried wheels)."""
    files = metadata.distribution(name).files or []
    where = Path(str(files[0].locate())).resolve() if files else None
    return where is not None and any(where.is_relative_to(f.resolve()) for f in folders)


def check_versions(roots: list[Requirement], folders: list[Path]) -> tuple[list[str], list[str]]:
    """Every requirement reachable from ``roots`` (installed distributions' Requires-Dist), checked
    against what is installed. Returns the gaps in words, each once: those eqakit or a carried wheel
    (installed from ``folders``) has, and those among the image's own packages."""
    gaps: dict[str, str] = {}
    image_gaps: dict[str, str] = {}
    seen: set[str] = set()
    queue = deque((req, "eqakit", True, set[str]()) for req in roots)
    while queue:
        req, by, ours, extras = queue.popleft()
        if not applies(req, extras):
            continue
        name = canonicalize_name(req.name)
        found = gaps if ours else image_gaps
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found.setdefault(name, f"{req.name} missing ({by} needs {req})")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            found.setdefault(name, f"{req.name} {version} does not fit ({by} needs {req})")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        mine = carried(req.name, folders)
        for line in metadata.requires(req.name) or []:
            queue.append((Requirement(line), f"{req.name} {version}", mine, set(req.extras)))
    return list(gaps.values()), [g for n, g in image_gaps.items() if n not in gaps]


def modules_of(dist: str) -> list[str]:
    """The importable top-level modules of a distribution: the one named like it, else its public ones."""
    tops = [
        m for m, dists in metadata.packages_distributions().items() if dist in map(canonicalize_name, dists)
    ]
    same = [m for m in tops if canonicalize_name(m) == dist]
    return same or sorted(m for m in tops if not m.startswith("_") and m.isidentifier())


def check_imports(roots: list[Requirement]) -> list[str]:
    for req in roots:
        name = canonicalize_name(req.name)
        for module in modules_of(name):
            try:
                importlib.import_module(module)
            except Exception as error:  # an import that raises anything is as good as missing
                return [f"import {module} ({req.name}) raised {type(error).__name__}: {error}"]
    sys.path.insert(0, str(REPO / "src"))  # eqakit itself runs from the tree, as gpu_check.sh does
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:
            return [f"import {module} raised {type(error).__name__}: {error}"]
    return []


def device_line(device: str) -> str:
    import torch

    if device == "cpu":
        return f"torch {torch.__version__} on the CPU"
    if not torch.cuda.is_available():
        raise Failed(
            f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}); "
            "run on the GPU machine, or pass --device cpu"
        )
    name = torch.cuda.get_device_name()
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
    return f"torch {torch.__version__} on {name} (CUDA {torch.version.cuda}, {bf16})"


def preflight(device: str, folders: list[Path]) -> str:
    """The success line, or Failed with the first failing phase's gaps."""
    roots, python = project()
    here = platform.python_version()
    if not python.contains(here):
        raise Failed(f"python {here} does not fit requires-python {python}")
    skipped = [r for r in roots if canonicalize_name(r.name) in NOT_EXERCISED]
    wanted = [r for r in roots if r not in skipped] + [Requirement(r) for r in EXTRA]
    gaps, image_gaps = check_versions(wanted, folders)
    if gaps:
        raise Failed("; ".join(gaps) + " (fetch wheels here: bash benchmarks/gpu_wheels.sh, then carry .whl)")
    if gaps := check_imports(wanted):
        raise Failed("; ".join(gaps))
    line = device_line(device)
    versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("transformers", "peft", "accelerate"))
    try:
        fa2 = f"flash_attn {metadata.version('flash_attn')}"
    except metadata.PackageNotFoundError:
        fa2 = "flash_attn not installed (no fa2 rows)"
    notes = [f"{r.name} not checked ({NOT_EXERCISED[canonicalize_name(r.name)]})" for r in skipped]
    notes += [f"the image's own: {gap}" for gap in image_gaps]
    return "; ".join([f"python {here}, {line}, {versions}", fa2, *notes])


# ---- here: do the wheels in .whl, with the image's packages, cover eqakit? -------------------------


def read_image(path: Path) -> dict[str, str | None]:
    """gpu_image.txt: name -> version (None: in the image, version not known)."""
    image: dict[str, str | None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = version or None
    return image


def read_wheels(folder: Path) -> tuple[dict[str, tuple[str, list[Requirement]]], list[str]]:
    """name -> (version, requirements) of each wheel in ``folder``; and the names held twice."""
    wheels: dict[str, tuple[str, list[Requirement]]] = {}
    twice = []
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(meta).decode("utf-8")
        fields = [line.split(": ", 1) for line in text.split("\n\n")[0].splitlines() if ": " in line]
        name = canonicalize_name(next(v for k, v in fields if k == "Name"))
        version = next(v for k, v in fields if k == "Version")
        if name in wheels:
            twice.append(name)
        wheels[name] = (version, [Requirement(v) for k, v in fields if k == "Requires-Dist"])
    return wheels, twice


def check_wheels(folder: Path) -> int:
    """Each of eqakit's requirements, and each carried wheel's, met by a carried wheel or by the
    image (its known version checked). Prints the gaps; the last line lists the missing names (for
    gpu_wheels.sh to fetch) or says none. Exit status 1 on a gap."""
    wheels, twice = read_wheels(folder)
    image = read_image(IMAGE)
    roots, _ = project()
    needs = [(r, "eqakit", set[str]()) for r in roots + [Requirement(e) for e in EXTRA]]
    needs += [(r, f"{n} {v}", set[str]()) for n, (v, reqs) in wheels.items() for r in reqs]
    missing: dict[str, str] = {}
    unverified: set[str] = set()
    for req, by, extras in needs:
        name = canonicalize_name(req.name)
        if not applies(req, extras, TARGET) or name in NOT_EXERCISED:
            continue
        have = wheels[name][0] if name in wheels else image.get(name)
        if name not in wheels and name not in image:
            missing.setdefault(name, f"{req.name} neither carried nor in the image ({by} needs {req})")
        elif have is None:
            unverified.add(name)
        elif req.specifier and not req.specifier.contains(Version(have), prereleases=True):
            where = "carried" if name in wheels else "the image's"
            missing.setdefault(name, f"{where} {req.name} {have} does not fit ({by} needs {req})")
    for name in twice:
        print(f"gpu_preflight: {name} is in {folder} twice: keep one version")
    for gap in missing.values():
        print(f"gpu_preflight: {gap}")
    print(
        f"gpu_preflight: {len(wheels)} wheels carried; in the image, version not known here "
        f"(checked there): {', '.join(sorted(unverified)) or 'none'}"
    )
    print(f"missing: {' '.join(sorted(missing))}" if missing else "missing: none")
    return 1 if missing or twice else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--carried",
        type=Path,
        action="append",
        default=[],
        help="where the carried wheels are installed (their requirements are checked like eqakit's)",
    )
    parser.add_argument("--wheels", type=Path, help="check this folder of wheels against the image instead")
    args = parser.parse_args()
    if args.wheels is not None:
        return check_wheels(args.wheels)
    try:
        print(f"preflight ok: {preflight(args.device, args.carried)}", flush=True)
    except Failed as failed:
        print(f"preflight failed: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
