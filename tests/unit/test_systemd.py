"""systemd/: the unit verifies cleanly, scores <= 1.5 exposure, and still lets blockd do its job.

`systemd-analyze verify` exits 0 on unknown keys and bad values, so the tests assert that it
prints nothing. The unit names /usr/local/bin/blockd, which a test host does not have: the
tests copy the unit to a temp dir and point only the binary path at an existing file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "blockd.service"
BINARY = "/usr/local/bin/blockd"
MAX_EXPOSURE = 1.5

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze not installed (Debian package systemd)")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values in order, for the [Service]/[Unit]/[Install] lines of a unit file."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit under its own name in tmp_path, with ExecStart's binary replaced by one that exists."""
    text = UNIT.read_text() if text is None else text
    exe = Path(sys.executable).with_name("blockd")
    exe = exe if exe.exists() else Path("/bin/true")
    rewritten, n = re.subn(rf"^ExecStart={re.escape(BINARY)} ", f"ExecStart={exe} ", text, flags=re.M)
    assert n == 1, f"expected one 'ExecStart={BINARY} ...' line in {UNIT.name}"
    out = tmp_path / UNIT.name
    out.write_text(rewritten)
    return out


def run(*args: str) -> subprocess.CompletedProcess[str]:
    # SYSTEMD_LOG_COLOR etc. would change the text; keep the environment plain.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


def exposure(unit: Path) -> float:
    r = run(analyze or "systemd-analyze", "security", "--offline=true", "--no-pager", str(unit))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, f"no 'Overall exposure level' line (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return float(m.group(1))


# --- verify -------------------------------------------------------------------------------------

@needs_analyze
def test_verify_prints_nothing(tmp_path: Path) -> None:
    r = run(analyze or "", "verify", str(runnable_copy(tmp_path)))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@needs_analyze
@pytest.mark.parametrize("bad, expect", [
    ("ProtectSystm=strict", "Unknown key"),
    ("WatchdogSec=soon", "ignoring: soon"),
])
def test_verify_reports_mistakes(tmp_path: Path, bad: str, expect: str) -> None:
    """The check above can fail: verify does print for a typo'd key or a bad value."""
    text = UNIT.read_text().replace("[Service]\n", f"[Service]\n{bad}\n", 1)
    r = run(analyze or "", "verify", str(runnable_copy(tmp_path, text)))
    assert expect in r.stdout + r.stderr


# --- security score -------------------------------------------------------------------------------

@needs_analyze
def test_exposure_at_most_target(tmp_path: Path) -> None:
    score = exposure(runnable_copy(tmp_path))
    assert score <= MAX_EXPOSURE, f"{UNIT.name}: exposure {score} > {MAX_EXPOSURE}"


@needs_analyze
def test_exposure_parse_sees_a_weaker_unit(tmp_path: Path) -> None:
    """Without the sandboxing lines the score is much worse, so the parse reads the real number."""
    keep = ("Type", "ExecStart", "User", "Group")
    text = "\n".join(ln for ln in UNIT.read_text().splitlines()
                     if ln.startswith("[") or ln.partition("=")[0] in keep)
    assert exposure(runnable_copy(tmp_path, text + "\n")) > 5.0


# --- what blockd needs must survive the hardening --------------------------------------------------

def test_unit_keeps_what_blockd_needs() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]  # sdnotify.py: READY=1 after the first pass
    assert s["ExecStart"] == [f"{BINARY} run --config /etc/blockd/blockd.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["Restart"] == ["on-failure"]
    caps = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}  # netlink; port 53
    assert set(" ".join(s["CapabilityBoundingSet"]).split()) == caps
    assert set(" ".join(s["AmbientCapabilities"]).split()) == caps
    assert {"AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"} <= set(" ".join(s["RestrictAddressFamilies"]).split())
    # Either would cut blockd off from the host's netfilter (see the comments in the unit).
    for key in ("PrivateNetwork", "PrivateUsers", "DynamicUser"):
        assert s.get(key, ["no"])[-1] in ("no", "false", "0"), key
    assert s["User"] == ["blockd"] and s["StateDirectory"] == ["blockd"]


def test_unit_caps_memory_with_headroom_for_1m_names() -> None:
    """MemoryMax= is set, above MemoryHigh=, and both above the 1M-name compile peak (848 MiB)."""
    s = unit_settings(UNIT.read_text())
    size = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

    def parse(v: str) -> int:
        return int(v[:-1]) * size[v[-1]] if v[-1] in size else int(v)
    high, top = parse(s["MemoryHigh"][-1]), parse(s["MemoryMax"][-1])
    assert 848 << 20 < high < top, (high, top)


def test_unit_and_default_config_agree() -> None:
    """The shipped blockd.yaml writes only inside the unit's StateDirectory= (all else is read-only)."""
    from blockd.settings import load_settings

    s = unit_settings(UNIT.read_text())
    state = Path("/var/lib") / s["StateDirectory"][0]
    cfg = load_settings(SYSTEMD / "blockd.yaml")
    assert cfg.state_dir == state
    for written in (cfg.daemon.attest_dir, cfg.daemon.audit_log):
        assert written is not None and Path(written).is_relative_to(state), written
    # The unit's ExecStart reads /etc/blockd/blockd.yaml: relative paths land in /etc/blockd.
    assert s["ConfigurationDirectory"] == ["blockd"]
    assert s["IPAddressAllow"] == ["localhost"]
    dns = cfg.enforcers.dns
    assert dns is not None
    # IPAddressDeny=any allows loopback only: everything the default config talks to is local.
    loopback = {"127.0.0.1", "::1"}
    assert {h for h, _ in dns.listen + dns.upstreams} <= loopback
    assert cfg.daemon.metrics_listen is not None and cfg.daemon.metrics_listen[0] in loopback


# --- sysusers / tmpfiles ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles --root needs root to chown")
def test_sysusers_and_tmpfiles_apply_cleanly(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    r = run("systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "blockd.sysusers"))
    assert r.returncode == 0 and "ignor" not in r.stderr.lower(), r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^blockd:x:\d+:\d+:[^:]*:/var/lib/blockd:/usr/sbin/nologin$", passwd, re.M), passwd
    gid = int(re.search(r"^blockd:x:(\d+):", (tmp_path / "etc" / "group").read_text(), re.M).group(1))  # type: ignore[union-attr]
    r = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(SYSTEMD / "blockd.tmpfiles"))
    assert (r.returncode, r.stderr) == (0, "")
    st = (tmp_path / "etc" / "blockd").stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o750", 0, gid)


# --- MemoryDenyWriteExecute= --------------------------------------------------------------------------

MDWE_SMOKE = r"""
import ctypes, errno, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77 if ctypes.get_errno() == errno.EINVAL else 1)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X mapping allowed: MDWE not in force")
except PermissionError:
    pass
import asyncio, importlib, pkgutil, socket
import blockd
for m in pkgutil.walk_packages(blockd.__path__, "blockd."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from blockd import minisign, watch
key = minisign.generate()
data = b"order"
minisign.verify(data, minisign.parse_signature(minisign.sign(data, key)), key.public)
assert watch._libc() is not None  # ctypes + find_library (spawns ldconfig)
async def udp():
    loop = asyncio.get_running_loop()
    got = loop.create_future()
    class P(asyncio.DatagramProtocol):
        def datagram_received(self, d, a): got.set_result(d)
    t, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", t.get_extra_info("sockname"))
    assert await asyncio.wait_for(got, 5) == b"x"
    t.close()
asyncio.run(udp())
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_MDWE is Linux-only")
def test_python_and_blockd_run_without_write_execute_memory() -> None:
    """The kernel's PR_SET_MDWE refuses what MemoryDenyWriteExecute=yes refuses (W+X maps, gaining X)."""
    r = subprocess.run([sys.executable, "-c", MDWE_SMOKE], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    if r.returncode == 77:
        pytest.skip("kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
