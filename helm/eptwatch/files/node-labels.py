"""eptwatch node-labels init container: copy this node's Kubernetes labels into the agent's labels file.

Kubernetes node labels are not available through the downward API, so this reads the node object
(RBAC: get on nodes) and writes its labels in the downward API's format, one key="value" per line, after
the pod's own labels (EPTWATCH_LABELS_BASE, a downward API file) when given. Standard library only: it
runs with the agent image's Python.

Environment:
  NODE_NAME                       the node (fieldRef spec.nodeName)
  EPTWATCH_LABELS_OUT             the file to write (atomically)
  EPTWATCH_LABELS_BASE            optional downward API labels file to start from
  EPTWATCH_NODE_LABELS_INCLUDE    comma-separated glob patterns of label keys to copy ("" = all)
  EPTWATCH_NODE_LABELS_FAIL_OPEN  "1": if the API cannot be read, write the base labels and exit 0
  EPTWATCH_K8S_API                API base URL (default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)
  EPTWATCH_SA_DIR                 service account directory (token, ca.crt)
  EPTWATCH_NODE_LABELS_ATTEMPTS   tries before giving up (default 5)
  EPTWATCH_NODE_LABELS_RETRY_SECONDS  first delay between tries, doubling (default 1)
"""

from __future__ import annotations

import fnmatch
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_SECONDS = 10


def log(msg: str) -> None:
    print(f"node-labels: {msg}", file=sys.stderr, flush=True)


def api_base() -> str:
    explicit = os.environ.get("EPTWATCH_K8S_API")
    if explicit:
        return explicit.rstrip("/")
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise RuntimeError("KUBERNETES_SERVICE_HOST is not set and EPTWATCH_K8S_API is not given")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"https://{host}:{port}"


def fetch_node_labels(node: str, sa_dir: str) -> dict[str, str]:
    url = f"{api_base()}/api/v1/nodes/{urllib.parse.quote(node, safe='')}"
    with open(os.path.join(sa_dir, "token"), encoding="utf-8") as f:
        token = f.read().strip()
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=os.path.join(sa_dir, "ca.crt"))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_SECONDS, context=context) as resp:
        obj = json.load(resp)
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if not isinstance(labels, dict):
        raise RuntimeError(f"{url}: metadata.labels is not a mapping")
    return {str(k): str(v) for k, v in labels.items()}


def select(labels: dict[str, str], patterns: list[str]) -> dict[str, str]:
    if not patterns:
        return dict(labels)
    return {k: v for k, v in labels.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def render(base_text: str, labels: dict[str, str]) -> str:
    """The base file's lines as they are, then the node's labels (the downward API quotes like JSON)."""
    lines = [line for line in base_text.splitlines() if line.strip()]
    lines += [f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())]
    return "".join(line + "\n" for line in lines)


def main() -> int:
    node = os.environ.get("NODE_NAME", "")
    out = os.environ.get("EPTWATCH_LABELS_OUT", "")
    if not node or not out:
        log("NODE_NAME and EPTWATCH_LABELS_OUT must be set")
        return 2
    base_path = os.environ.get("EPTWATCH_LABELS_BASE", "")
    patterns = [p.strip() for p in os.environ.get("EPTWATCH_NODE_LABELS_INCLUDE", "").split(",") if p.strip()]
    fail_open = os.environ.get("EPTWATCH_NODE_LABELS_FAIL_OPEN", "0") == "1"
    sa_dir = os.environ.get("EPTWATCH_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
    base_text = ""
    if base_path:
        try:
            with open(base_path, encoding="utf-8") as f:
                base_text = f.read()
        except OSError as exc:
            log(f"{base_path}: cannot read the pod's labels: {exc.strerror}")
            return 1
    attempts = int(os.environ.get("EPTWATCH_NODE_LABELS_ATTEMPTS") or 5)
    labels: dict[str, str] | None = None
    delay = float(os.environ.get("EPTWATCH_NODE_LABELS_RETRY_SECONDS") or 1.0)
    for attempt in range(1, attempts + 1):
        try:
            labels = fetch_node_labels(node, sa_dir)
            break
        except (OSError, urllib.error.URLError, ValueError, RuntimeError) as exc:
            log(f"attempt {attempt}/{attempts}: cannot read node {node}: {exc}")
            if attempt < attempts:
                time.sleep(delay)
                delay *= 2
    if labels is None:
        if not fail_open:
            return 1
        log("starting the agent without node labels (failOpen)")
        labels = {}
    chosen = select(labels, patterns)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render(base_text, chosen))
    os.replace(tmp, out)
    log(f"wrote {len(chosen)} node label(s) of {node} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
