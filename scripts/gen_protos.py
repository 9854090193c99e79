"""Generates Python code, mypy stubs, the Envoy descriptor set and the OpenAPI document.

`python scripts/gen_protos.py` writes into the repository; `--check` regenerates into a
temporary tree and exits 1 listing every committed file that differs (used by the tests).
Proto path = Python package path (`protos/tally/budget/v1/budget.proto` ->
`tally/budget/v1/budget_pb2.py`), so generated imports need no rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DESCRIPTOR = Path("gateway/descriptor.pb")
OPENAPI = Path("gateway/openapi.json")
# google.rpc types go into the descriptor set so Envoy can print error details as JSON.
EXTRA_DESCRIPTOR_INPUTS = ["google/rpc/status.proto", "google/rpc/error_details.proto", "google/api/httpbody.proto"]


def service_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "tally").rglob("*.proto"))


def run_protoc(args: list[str]) -> None:
    wkt = str(resources.files("grpc_tools") / "_proto")
    bindir = Path(sys.executable).parent
    plugins = [f"--plugin=protoc-gen-{name}={bindir / f'protoc-gen-{name}'}" for name in ("mypy", "mypy_grpc")]
    if protoc.main(["protoc", f"-I{PROTOS}", f"-I{wkt}", *plugins, *args]) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(out: Path) -> list[Path]:
    """Writes every generated file under `out`; returns their paths relative to `out`."""
    files = service_protos()
    run_protoc(
        [f"--python_out={out}", f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}", *files]
    )
    (out / DESCRIPTOR).parent.mkdir(parents=True, exist_ok=True)
    run_protoc([f"--descriptor_set_out={out / DESCRIPTOR}", "--include_imports", *files, *EXTRA_DESCRIPTOR_INPUTS])
    generated = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    # Packages for the generated modules (tally/ itself is hand-written).
    for directory in {p.parent for p in generated if p.suffix in (".py", ".pyi")}:
        current = directory
        while current != Path("tally") and current != Path("."):
            init = out / current / "__init__.py"
            if not init.exists():
                init.write_text("")
                generated.append(current / "__init__.py")
            current = current.parent
    sys.path.insert(0, str(ROOT))
    from gateway.openapi import render_openapi

    (out / OPENAPI).write_text(render_openapi((out / DESCRIPTOR).read_bytes()))
    generated.append(OPENAPI)
    return sorted(set(generated))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed generated files are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        if args.check:
            stale = [
                str(p)
                for p in generated
                if not (ROOT / p).exists() or not filecmp.cmp(out / p, ROOT / p, shallow=False)
            ]
            if stale:
                print("stale generated files (run `make protos`):\n  " + "\n  ".join(stale), file=sys.stderr)
                return 1
            return 0
        for rel in generated:
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, ROOT / rel)
    print(f"generated {len(generated)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
