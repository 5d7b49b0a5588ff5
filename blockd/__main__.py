"""`blockd` command line: parse arguments, call the pipeline, print, exit.

Exit codes: 0 clean; 1 something was refused or is invalid; 2 usage error.
Every command takes `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from blockd import minisign, trust
from blockd.clock import MonotonicWallClock
from blockd.reconcile import latest_acceptance
from blockd.compile import Compilation, Prepared, merge, prepare
from blockd.errors import BlockdError
from blockd.fsutil import atomic_write, read_regular
from blockd.intake import (
    Context, InputFailure, catalog_refusal, context_from_copy, load_context, policy_files, read_candidates,
    state_candidates, unexpandable_accepted,
)
from blockd.model import Policy, RuleSet, diff, union_intervals
from blockd.names import display
from blockd.policy import read_signed
from blockd.selection import Selection, Verdict, newly_accepted, select
from blockd.ranges import format_addr, subtract, to_cidrs
from blockd.settings import Settings, load_settings
from blockd.state import StateStore

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
MAX_SIGN_BYTES = 1 << 30
MAX_VERIFY_BYTES = 64 << 20  # the largest file blockd verifies (a policy or a prefix table)
MAX_STATEMENT_BYTES = 256 << 20


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)  # SUPPRESSed where not given (see _parser)
    if sys.stdout is None and getattr(args, "command_name", None) != "run":
        print("blockd: error: stdout is closed; nothing could be reported", file=sys.stderr)
        return EXIT_REFUSED
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = int(args.func(args))
        if sys.stdout is not None:
            sys.stdout.flush()
        return code
    except BlockdError as e:
        _emit_error(args, e)
        return EXIT_REFUSED
    except BrokenPipeError:
        # The reader went away (`blockd plan | head`): not an error of ours, but not a success.
        _quiet_stdout()
        return EXIT_REFUSED
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _emit_error(args, BlockdError(f"{where}{e.strerror or e}"))
        if e.filename is None:
            _quiet_stdout()  # stdout itself failed (a full disk): the exit flush must not fail again
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if os.environ.get("BLOCKD_DEBUG"):
            raise
        print(f"blockd: internal error: {type(e).__name__}: {e} (set BLOCKD_DEBUG=1 for a traceback; "
              f"please report it)", file=sys.stderr)
        return EXIT_REFUSED


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass


def _emit_error(args: argparse.Namespace, e: BlockdError) -> None:
    if getattr(args, "json", False):
        where = getattr(e, "where", "") or None
        message = getattr(e, "message", None) or str(e)
        try:
            print(json.dumps({"command": getattr(args, "command_name", None), "ok": False,
                              "error": {"type": type(e).__name__, "message": message, "where": where},
                              "message": str(e)}))
            return
        except BrokenPipeError:
            _quiet_stdout()
        except OSError:
            pass  # stdout is full or broken: say it on stderr instead
    print(f"blockd: error: {e}", file=sys.stderr)


def _parse_now(text: str) -> datetime:
    """`--now`: ISO 8601 with a zone (argparse turns the ValueError into a usage error, exit 2)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time; e.g. 2026-11-29T12:00:00Z") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; e.g. 2026-11-29T12:00:00Z")
    return when.astimezone(timezone.utc)


def _signature_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a signer name is letters, digits, '-' and '_' (no '/' or '.')")
    return text


def _settings(args: argparse.Namespace) -> Settings:
    s = load_settings(Path(args.config) if args.config else None)
    over = {k: Path(v) for k in ("trust_store", "catalog_dir", "state_dir", "policy_dir") if (v := getattr(args, k, None))}
    if over:
        from dataclasses import replace

        s = replace(s, **over)
    return s


# -- keys and signatures ---------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    pub, sec = Path(args.pub), Path(args.sec)
    if pub.resolve() == sec.resolve():
        raise BlockdError(f"--pub and --sec name the same file ({pub}); the public key would overwrite the secret key")
    for p in (pub, sec):
        if p.exists() and not args.force:
            raise BlockdError(f"{p} exists; use --force to overwrite")
        if p.exists() and not p.is_file():
            raise BlockdError(f"{p} is not a regular file")
        if not p.parent.is_dir():
            raise BlockdError(f"{p.parent} is not a directory; create it first")
    key = minisign.generate()
    atomic_write(sec, key.to_text().encode(), mode=0o600)
    atomic_write(pub, key.public.to_text(args.comment).encode())
    _out(args, {"key_id": key.public.id_hex, "public_key": str(pub), "secret_key": str(sec)},
         f"key {key.public.id_hex}: public {pub}, secret {sec} (mode 0600, unencrypted like `minisign -W`)")
    return EXIT_OK


def _secret_key(path: str) -> minisign.SecretKey:
    password = os.environ.get("BLOCKD_KEY_PASSWORD")
    raw = read_regular(Path(path), 4096, what="minisign secret key")
    return minisign.parse_secret_key(raw.decode("utf-8", errors="replace"), where=path,
                                     password=password.encode() if password is not None else None)


def _require_regular(path: Path, what: str) -> None:
    """A file the command reads must be a regular file: a FIFO would hang it, /dev/zero fill memory."""
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise BlockdError(f"{path}: cannot read {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BlockdError(f"{path}: not a regular file; expected a {what}")


def _public_key(path: str) -> minisign.PublicKey:
    raw = read_regular(Path(path), 4096, what="minisign public key")
    return minisign.parse_public_key(raw.decode("utf-8", errors="replace"), where=path)


def cmd_sign(args: argparse.Namespace) -> int:
    key = _secret_key(args.sec)
    written = []
    for name in args.files:
        path = Path(name)
        data = read_regular(path, MAX_SIGN_BYTES, what="file to sign")
        comment = args.trusted_comment or f"timestamp:{int(datetime.now().timestamp())}\tfile:{path.name}"
        text = minisign.sign(data, key, trusted_comment=comment, prehash=not args.legacy)
        out = path.with_name(f"{path.name}.{args.name}.minisig" if args.name else f"{path.name}.minisig")
        atomic_write(out, text.encode())
        written.append(str(out))
    _out(args, {"key_id": key.public.id_hex, "signatures": written},
         "\n".join(f"signed {w} with key {key.public.id_hex}" for w in written))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    store = trust.load_trust_store(_settings(args).trust_store)
    results, worst = [], EXIT_OK
    for name in args.files:
        try:
            v = read_signed(Path(name), store, role=args.role, max_bytes=MAX_VERIFY_BYTES, what="file").verified
            results.append({"file": name, "ok": True, "issuer": v.issuer, "signers": list(v.signers)})
        except BlockdError as e:
            results.append({"file": name, "ok": False, "error": str(e)})
            worst = EXIT_REFUSED
    text = "\n".join(
        f"{r['file']}: OK, issuer {r['issuer']}, keys {', '.join(r['signers'])}" if r["ok"] else f"{r['error']}"
        for r in results
    )
    _out(args, {"ok": worst == EXIT_OK, "files": results}, text)
    return worst


# -- check, plan, accept: one path (selection.select), as the daemon takes it -------------------


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What the daemon would hold: the given files (or the policy directory) plus the state."""

    ctx: Context
    now: datetime
    given: tuple[str, ...]  # the files the command was asked about
    selection: Selection
    compilation: Compilation
    before: Compilation  # the state's accepted policies alone (what is in force now)
    failures: tuple[InputFailure, ...]
    explicit: bool = True  # files were named (not the whole policy directory)


def _evaluate(args: argparse.Namespace) -> Evaluation:
    settings = _settings(args)
    ctx, failures = load_context(settings, save=False)
    paths = [Path(p) for p in args.policies] or (policy_files(settings.policy_dir) if settings.policy_dir.is_dir() else [])
    # Judged as the daemon judges it: the wall clock, or the state's high-water mark if the
    # clock stepped back (blockd.clock); nothing is written.
    now = args.now or MonotonicWallClock(settings.state_dir / "clock.json", latest_acceptance(settings)).now()
    found, bad = read_candidates(paths, ctx)
    kept, kept_bad = state_candidates(ctx)
    cache: dict[str, Prepared] = {}

    def prepared(p: Policy) -> Prepared:
        if p.digest not in cache:
            cache[p.digest] = prepare(p, ctx.catalog, ctx.compile.guards)
        return cache[p.digest]

    accepted = ctx.state.accepted_serials()
    baseline = ctx.state.baseline()
    sel = select([*found, *kept], [*bad, *kept_bad], accepted, now, prepared)
    broken = unexpandable_accepted(sel, accepted)
    good = context_from_copy(settings, ctx.store, ctx.state) if broken is not None else None
    if broken is not None and good is not None and good.key != ctx.key:
        # As the daemon does: a catalog that cannot expand an accepted policy is refused, the
        # last good one (the state's copy) is used, and the refusal is reported.
        failures.append(catalog_refusal(broken, good.origin))
        ctx = good
        found, bad = read_candidates(paths, ctx)
        kept, kept_bad = state_candidates(ctx)
        cache.clear()
        sel = select([*found, *kept], [*bad, *kept_bad], accepted, now, prepared)
    old = select(kept, kept_bad, accepted, now, prepared)
    comp = merge(sel.prepared, ctx.compile, baseline, sel.order_statuses(), sel.policy_statuses())
    before = merge(old.prepared, ctx.compile, baseline, old.order_statuses(), old.policy_statuses())
    return Evaluation(ctx, now, tuple(str(p) for p in paths), sel, comp, before, tuple(failures),
                      explicit=bool(args.policies))


def _verdicts(ev: Evaluation) -> list[Verdict]:
    """The given files' verdicts, and the state's copies that stay in force beside them."""
    given = set(ev.given)
    return [v for v in ev.selection.verdicts if v.source in given or (v.from_state and v.status == "active")]


def _takes_effect(ev: Evaluation) -> bool:
    """Every file asked about is (or will be, when pending) in force, and no rule is refused.

    Without file arguments the question is about the policy directory as the daemon sees it:
    an old serial left there (superseded) or an ended one (expired) is not a fault; a refused
    file or rule is."""
    given = set(ev.given)
    fine = ("active", "pending") if ev.explicit else ("active", "pending", "superseded", "expired")
    return not ev.compilation.refused and all(v.status in fine for v in ev.selection.verdicts if v.source in given)


def _report(command: str, ev: Evaluation, ok: bool) -> dict[str, object]:
    """The one JSON shape of check, plan and accept (docs/cli.md)."""
    rs = ev.compilation.ruleset
    verdicts = _verdicts(ev)
    return {
        "command": command,
        "ok": ok,
        "now": ev.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "digest": rs.digest,
        "counts": rs.counts(),
        "policies": [v.as_json() for v in verdicts],
        "rejected": [v.as_json() for v in verdicts if v.status == "rejected"],
        "orders": [{"order": k, "status": o.status, "rules": o.rules, "refused": o.refused}
                   for k, o in sorted(ev.compilation.orders.items())],
        "findings": [{"order": f.order_id, "rule": f.rule, "guard": f.guard, "allowed": f.allowed,
                      "reason": f.reason} for f in ev.compilation.findings],
        "warnings": list(ev.compilation.warnings),
        "input_failures": [{"input": f.input, "where": f.where, "error": f.message} for f in ev.failures],
    }


def _verdict_lines(ev: Evaluation) -> list[str]:
    lines = [f"input refused: {f}" for f in ev.failures]
    for v in _verdicts(ev):
        who = f"issuer {v.issuer} serial {v.serial}" if v.issuer else ""
        where = " (state copy)" if v.from_state else ""
        if v.status == "rejected":
            lines.append(f"{v.source}{where}: REJECTED ({v.kind}): {v.reason}")
        else:
            lines.append(f"{v.source}{where}: {v.status.upper()} {who}: {v.reason}")
    return lines


def cmd_check(args: argparse.Namespace) -> int:
    ev = _evaluate(args)
    ok = _takes_effect(ev)
    report = _report("check", ev, ok)
    _out(args, report, "\n".join(_report_text(report, args.verbose, ev)))
    return EXIT_OK if ok else EXIT_REFUSED


def cmd_plan(args: argparse.Namespace) -> int:
    ev = _evaluate(args)
    old, new = ev.before.ruleset, ev.compilation.ruleset
    plan = diff(old, new)

    # Show addresses, not enforcer elements: /24 -> /25 reads as "remove the other /25".
    def addrs(v: int, a: RuleSet, b: RuleSet) -> list[str]:
        fam = "v4" if v == 4 else "v6"
        only = subtract(union_intervals(getattr(a, fam)), union_intervals(getattr(b, fam)))
        return [f"{format_addr(v, n)}/{p}" for n, p in to_cidrs(v, only)]

    ok = _takes_effect(ev)
    data = _report("plan", ev, ok)
    data.update({
        "from_digest": old.digest,
        "to_digest": new.digest,
        "add": {"domains": [display(*d) for d in plan.add_domains], "ipv4": addrs(4, new, old),
                "ipv6": addrs(6, new, old)},
        "remove": {"domains": [display(*d) for d in plan.del_domains], "ipv4": addrs(4, old, new),
                   "ipv6": addrs(6, old, new)},
        "refused": [str(f) for f in ev.compilation.refused],
    })
    lines = _verdict_lines(ev) + [f"plan {old.digest[:12]} -> {new.digest[:12]}"]
    for verb, sign in (("add", "+"), ("remove", "-")):
        for kind in ("domains", "ipv4", "ipv6"):
            items = data[verb][kind]  # type: ignore[index]
            shown = items if args.verbose else items[:20]
            lines += [f"  {sign} {kind}: {x}" for x in shown]
            if len(items) > len(shown):
                lines.append(f"  {sign} {kind}: … {len(items) - len(shown)} more (--verbose)")
    lines += [f"refused: {f}" for f in data["refused"]]  # type: ignore[union-attr]
    _out(args, data, "\n".join(lines))
    return EXIT_OK if ok else EXIT_REFUSED


def cmd_accept(args: argparse.Namespace) -> int:
    """Record policies as accepted (replay protection and restore copies), all or none.

    The same selection as the daemon's: a file that would not be in force (rejected, expired,
    superseded, or with rules a guard refuses) stops the whole command and nothing is written;
    a pending file is left for the daemon to record when it takes effect.
    """
    if args.now is not None:
        # What is recorded becomes what the daemon restores: it must be in force at the real
        # clock, not at a time of the operator's choosing (that could drop the policy in force).
        raise BlockdError("accept records policies at the current time; --now is for check and plan")
    with StateStore(_settings(args).state_dir).lock("blockd accept"):
        ev = _evaluate(args)
        ok = _takes_effect(ev)
        given = set(ev.given)
        todo = [v for v in newly_accepted(ev.selection, ev.ctx.state.accepted_serials()) if v.source in given] if ok else []
        done = ev.ctx.state.commit([(v.policy, v.signed) for v in todo], ev.now) if todo else []
    data = _report("accept", ev, ok)
    data["accepted"] = [{"issuer": r.issuer, "serial": r.serial, "sha256": r.digest} for r in done]
    lines = _verdict_lines(ev) + [f"accepted {r.issuer} serial {r.serial}" for r in done]
    lines += [f"refused: {f}" for f in ev.compilation.refused]
    if not ok:
        lines.append("nothing recorded: every file must be in force or pending, with no rule refused")
    _out(args, data, "\n".join(lines))
    return EXIT_OK if ok else EXIT_REFUSED


def _report_text(r: dict, verbose: bool, ev: Evaluation) -> list[str]:
    c = r["counts"]
    lines = _verdict_lines(ev)
    lines.append(f"rule set {r['digest'][:16]}: {c['domain_exact']} exact names, {c['domain_subtree']} subtrees, "
                 f"{c['ipv4_ranges']} IPv4 ranges, {c['ipv6_ranges']} IPv6 ranges")
    lines += [f"order {o['order']}: {o['status']}, {o['rules']} rules" + (f", {o['refused']} refused" if o["refused"] else "")
              for o in r["orders"]][: None if verbose else 50]
    if len(r["orders"]) > 50 and not verbose:
        lines.append(f"… {len(r['orders']) - 50} more orders (--verbose)")
    findings = r["findings"] if verbose else r["findings"][:100]
    for f in findings:
        verdict = "ALLOWED" if f["allowed"] else "REFUSED"
        lines.append(f"{verdict} {f['guard']}: order {f['order']}: {f['rule']}: {f['reason']}")
    if len(r["findings"]) > len(findings):
        lines.append(f"… {len(r['findings']) - len(findings)} more findings (--verbose or --json)")
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines.append("OK" if r["ok"] else "REFUSED: see above")
    return lines


def _out(args: argparse.Namespace, data: object, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif text:
        print(text)


def cmd_run(args: argparse.Namespace) -> int:
    from blockd import logs
    from blockd.daemon import run

    logs.configure(json=not args.console, level=args.log_level)
    return run(_settings(args))


def cmd_rpz_config(args: argparse.Namespace) -> int:
    """Print the resolver configuration for the RPZ zones blockd serves for the policies in force."""
    from blockd.dns import rpz, rpzconfig
    from blockd.schema import endpoint

    ev = _evaluate(args)
    s = ev.ctx.settings.enforcers.rpz
    if s is None:
        raise BlockdError(f"{ev.ctx.settings.source}: enforcers.rpz is not configured; `rpz config` describes "
                          f"the zones of the rpz enforcer")
    if args.primary:
        try:
            primary = endpoint(args.primary, 53)
        except ValueError as e:
            raise BlockdError(f"--primary: {args.primary!r}: {e}") from None
    else:
        primary = s.listen[0]
        if primary[0] in ("0.0.0.0", "::", ""):
            raise BlockdError(f"enforcers.rpz.listen[0] is {primary[0]!r} (a wildcard): give the address resolvers "
                              f"reach blockd at with --primary HOST:PORT")
    try:
        known = rpz.load_state(s.state_file).get("zones") or {}
    except (OSError, ValueError):
        known = {}
    zones = rpzconfig.zones_for(s, ev.compilation.ruleset, known if isinstance(known, dict) else {})
    text = rpzconfig.render(args.resolver, s, zones, primary, state_dir=args.resolver_dir, refresh=args.refresh)
    data = {"command": "rpz config", "ok": True, "resolver": args.resolver, "layout": s.layout,
            "zones": [{"zone": z.origin, "key": z.key, "text": z.text, "zone_file": z.zone_file} for z in zones],
            "config": text}
    _out(args, data, text.rstrip("\n"))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """Load the config and everything `run` will use; every problem is reported at once."""
    settings = _settings(args)
    problems: list[str] = []
    try:
        ctx, failures = load_context(settings, save=False)
    except BlockdError as e:
        ctx, failures = None, []
        problems.append(str(e))
    problems += [str(f) for f in failures]
    if settings.shared_infra_dir is None:
        problems.append(f"{settings.source}: shared_infra_dir is not set: blocks of shared cloud/CDN ranges would "
                        f"not be refused; point it at the shipped shared-infra lists")
    d = settings.daemon
    if d.operator_key:
        try:
            _secret_key(d.operator_key)
        except BlockdError as e:
            problems.append(f"daemon.operator_key: {e}")
    if not settings.policy_dir.is_dir():
        problems.append(f"{settings.policy_dir}: policy_dir does not exist or is not a directory")
    e = settings.enforcers
    enabled = [n for n in ("nft", "ipset", "dns", "rpz", "bgp") if getattr(e, n) is not None]
    data = {"command": "config check", "ok": not problems, "config": settings.source, "enforcers": enabled,
            "issuers": sorted(ctx.store.issuers) if ctx else [],
            "services": sorted(ctx.catalog.services) if ctx else [], "policy_dir": str(settings.policy_dir),
            "problems": problems}
    if problems:
        text = "\n".join([f"{settings.source}: {len(problems)} problem(s):"] + [f"  {p}" for p in problems])
    else:
        text = (f"{settings.source}: OK; enforcers {', '.join(enabled) or 'none'}; issuers "
                f"{', '.join(data['issuers'])}; {len(data['services'])} services in the catalog")
    _out(args, data, text)
    return EXIT_REFUSED if problems else EXIT_OK


def cmd_attest_verify(args: argparse.Namespace) -> int:
    """docs/attestation.md "How to verify", steps 1-5: signature, shape, every enforcer holds
    its share as read back, and (for several files) the statement chain has no gap."""
    import hashlib

    from blockd import attest

    key = _public_key(args.key)
    results, worst = [], EXIT_OK
    signed = []
    for name in args.files:
        try:
            read_regular(Path(name), MAX_STATEMENT_BYTES, what="attestation statement")
            st = attest.verify(Path(name), key)
        except BlockdError as e:
            results.append({"file": name, "ok": False, "error": str(e), "problems": []})
            worst = EXIT_REFUSED
            continue
        pred = st["predicate"]
        problems = [] if args.signature_only else attest.check(st)
        if problems:
            worst = EXIT_REFUSED
        signed.append((Path(name).name, hashlib.sha256(Path(name).read_bytes()).hexdigest(), st))
        results.append({"file": name, "ok": not problems, "id": pred["attestation"]["id"],
                        "seq": pred["attestation"]["seq"], "subjects": [s["name"] for s in st["subject"]],
                        "problems": problems})
    gaps = attest.chain([x for x in signed if Path(x[0]).name != "latest.json"]) if len(signed) > 1 else []
    if gaps:
        worst = EXIT_REFUSED

    def line(r: dict[str, object]) -> str:
        if "id" not in r:
            return str(r["error"])
        head = f"{r['file']}: signature OK, attestation {r['id']} over {', '.join(r['subjects']) or 'no policy'}"  # type: ignore[arg-type]
        if not r["problems"]:
            return head + ("" if args.signature_only else "; every enforcer holds its share (read back)")
        return head + "; NOT ENFORCED AS ORDERED:\n" + "\n".join(f"  {p}" for p in r["problems"])  # type: ignore[attr-defined]

    _out(args, {"ok": worst == EXIT_OK, "files": results, "chain": gaps},
         "\n".join([*(line(r) for r in results), *(f"chain: {g}" for g in gaps)]))
    return worst


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from blockd import attest, audit

    if args.key and args.no_key:
        print("blockd: error: give --key or --no-key, not both", file=sys.stderr)
        return EXIT_USAGE
    key = _public_key(args.key) if args.key else None
    _require_regular(Path(args.log), "audit log")
    for name in args.attestation or ():
        read_regular(Path(name), MAX_STATEMENT_BYTES, what="attestation statement")
    anchors = []
    for name in args.attestation or ():
        st = attest.verify(Path(name), key) if key else json.loads(Path(name).read_bytes())
        head = attest.audit_head(st)
        if head is not None:
            anchors.append(head)
    v = audit.verify(Path(args.log), anchors=anchors, public_key=key, require_head=not args.no_head)
    base = v.recorded_head or v.head
    text = f"{args.log}: hash chain OK, {v.entries} entries"
    unsigned = v.entries - base.seq if key is not None else 0
    data: dict[str, object] = {"entries": v.entries, "head": base.as_json(), "head_signed_by": v.head_signed_by,
                               "unsigned_entries": unsigned, "anchors": len(anchors)}
    ok = True
    if key is not None:
        text += f"; head seq {base.seq} {base.sha256[:16]}… signed by {v.head_signed_by}"
        if unsigned:
            ok = False
            text += (f"; entries {base.seq + 1}..{v.entries} come after the signed head and are NOT covered by "
                     f"a signature (unsigned)" if unsigned > 1 else
                     f"; entry {v.entries} comes after the signed head and is NOT covered by a signature (unsigned)")
    elif args.no_key:
        text += f"; head seq {v.head.seq} {v.head.sha256[:16]}… UNVERIFIED (--no-key: no signature checked)"
    else:
        ok = False
        text += (f"; head seq {v.head.seq} is UNVERIFIED: no signature was checked. Give --key operator.pub, "
                 f"or --no-key to check the hash chain only")
    if anchors:
        text += f"; {len(anchors)} attestation anchor(s) match"
    _out(args, {"ok": ok, **data}, text)
    return EXIT_OK if ok else EXIT_REFUSED


# -- the regulator's side: compliance across operators, registry imports ----------------------


def _duration(text: str) -> float:
    """`90000`, `25h`, `90m`, `2d` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds or a number with s, m, h or d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def cmd_compliance(args: argparse.Namespace) -> int:
    from blockd.compliance import html, report
    from blockd.compliance.check import check

    now = args.now or datetime.now(timezone.utc)
    try:
        rep, refused = check([Path(p) for p in args.policies], Path(args.operators), Path(args.statements),
                             _settings(args), now, args.max_age)
    except BlockdError as e:
        _emit_error(args, e)
        return report.EXIT_INPUT
    doc = report.to_json(rep, refused_inputs=refused)
    if args.html:
        out = Path(args.html)
        atomic_write(out, html.render(doc, base=out.parent).encode())
    if args.prometheus:
        from blockd.compliance.metrics import exposition

        atomic_write(Path(args.prometheus), exposition(doc, datetime.now(timezone.utc).timestamp()))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(report.verdict_line(doc) if args.quiet else report.text(doc, verbose=args.verbose))
    return int(doc["exit_code"])


def _read_input(name: str) -> bytes:
    """A file's bytes; `.gz` files are decompressed (by name: the suffix says so, nothing is sniffed)."""
    import gzip

    data = Path(name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def _when(text: str | None, default: datetime, what: str) -> datetime:
    if text is None:
        return default
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"blockd: error: --{what} {text!r}: expected ISO 8601 with a zone, e.g. 2026-11-29T12:00:00Z") from None
    if t.tzinfo is None:
        raise SystemExit(f"blockd: error: --{what} {text!r} needs a time zone, e.g. 2026-11-29T12:00:00Z")
    return t.astimezone(timezone.utc)


def cmd_import(args: argparse.Namespace) -> int:
    """Registry formats -> an unsigned policy YAML for review and signing (`blockd sign`)."""
    from datetime import timedelta

    from blockd import importers

    issued = _when(args.issued_at, datetime.now(timezone.utc).replace(microsecond=0), "issued-at")
    not_before = _when(args.not_before, issued, "not-before")
    not_after = _when(args.not_after, not_before + timedelta(days=args.valid_days), "not-after")
    when = {"issuer": args.issuer, "serial": args.serial, "issued_at": issued, "not_before": not_before,
            "not_after": not_after}
    inputs: list[str] = []
    checks: list[dict[str, str]] = []
    try:
        if args.format == "zi":
            inputs = [args.file]
            result = importers.zi_to_policy(_read_input(args.file), **when)
        elif args.format == "list":
            inputs = [args.file]
            text = _read_input(args.file).decode("utf-8")
            result = importers.list_to_policy(text.splitlines(), **when, order_id=args.order_id,
                                              authority=args.authority, reference=args.reference, url=args.url,
                                              action=args.action, subtree=args.subtree, syntax=args.syntax)
        else:
            lists = []
            for kind in importers.PS_KINDS:
                for i, name in enumerate(getattr(args, kind) or ()):
                    data = _read_input(name)
                    entries = importers.ps_entries(data, name)
                    sums = getattr(args, f"{kind}_sha256") or []
                    if i < len(sums):
                        matched = importers.ps_check_checksum(data, entries, _read_input(sums[i]), name)
                        checks.append({"file": name, "checksum": sums[i], "matched": matched})
                    lists.append((kind, name, entries))
                    inputs.append(name)
            if not lists:
                raise SystemExit("blockd: error: give at least one of --fqdn, --ipv4, --ipv6")
            result = importers.piracy_shield_to_policy(lists, **when, order_id=args.order_id,
                                                       authority=args.authority, reference=args.reference,
                                                       url=args.url)
    except UnicodeDecodeError as e:
        _emit_error(args, BlockdError(f"{inputs[-1] if inputs else args.file}: not {e.encoding} at byte {e.start} "
                                      f"({e.object[e.start:e.start + 1]!r}); the format is {e.encoding}"))
        return EXIT_REFUSED
    except (ValueError, OSError) as e:
        _emit_error(args, BlockdError(str(e)))
        return EXIT_REFUSED
    if args.output:
        atomic_write(Path(args.output), result.policy_yaml.encode())
    else:
        sys.stdout.write(result.policy_yaml)
    summary = {"inputs": inputs, "output": args.output, "orders": result.orders, "domains": result.domains,
               "cidrs": result.cidrs, "skipped": len(result.skipped),
               "skipped_by_reason": importers.skipped_summary(result.skipped),
               "skipped_lines": list(result.skipped), "checksums": checks}
    lines = [f"imported {', '.join(inputs)}: {result.orders} orders, {result.domains} domains, {result.cidrs} "
             f"prefixes; {len(result.skipped)} values not used"]
    lines += [f"  checksum {c['checksum']} matches {c['file']} ({c['matched']})" for c in checks]
    lines += [f"  {n} x {reason}" for reason, n in summary["skipped_by_reason"].items()]
    lines += [f"  not used: {s}" for s in result.skipped]
    # The policy may be on stdout: the report goes to stderr (or is the JSON on stdout with -o).
    if args.json and args.output:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(lines), file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from blockd.demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockd", description=__doc__.splitlines()[0] if __doc__ else None)
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", "-c", help="blockd.yaml (default: the checkout's policies/ layout)")
    common = argparse.ArgumentParser(add_help=False, parents=[config_only])
    # SUPPRESS: `blockd config --json check` and `blockd config check --json` both work.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    sub = p.add_subparsers(metavar="COMMAND")

    def add(name: str, func, help: str, parents: list[argparse.ArgumentParser] | None = None  # noqa: A002
            ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=parents or [common], help=help, description=help)
        sp.set_defaults(func=func, command_name=name)
        return sp

    sp = add("keygen", cmd_keygen, "create an Ed25519 key pair in minisign format")
    sp.add_argument("--pub", "-p", required=True, help="public key file to write (.pub)")
    sp.add_argument("--sec", "-s", required=True, help="secret key file to write (mode 0600)")
    sp.add_argument("--comment", help="untrusted comment for the public key")
    sp.add_argument("--force", "-f", action="store_true", help="overwrite existing files")

    sp = add("sign", cmd_sign, "write detached minisign signatures (FILE.minisig) for files")
    sp.add_argument("--sec", "-s", required=True, help="secret key (password in $BLOCKD_KEY_PASSWORD if encrypted)")
    sp.add_argument("--trusted-comment", "-t", help="signed comment (default: timestamp and file name)")
    sp.add_argument("--name", type=_signature_name, help="write FILE.NAME.minisig, for several signers of one file")
    sp.add_argument("--legacy", action="store_true", help="legacy 'Ed' signature of the raw file (not prehashed)")
    sp.add_argument("files", nargs="+", metavar="FILE")

    sp = add("verify", cmd_verify, "verify files' signatures against the trust store (k of n)")
    sp.add_argument("--trust-store", dest="trust_store", help="trust store directory")
    sp.add_argument("--role", choices=trust.ROLES, default="policy", help="role the signers must hold")
    sp.add_argument("files", nargs="+", metavar="FILE")

    for name, func, help in (
        ("check", cmd_check, "verify, compile and report findings for policies (exit 1 if anything is refused)"),
        ("plan", cmd_plan, "show what would change against the last accepted state"),
        ("accept", cmd_accept, "record policies as accepted (replay protection, restore copies)"),
    ):
        sp = add(name, func, help)
        sp.add_argument("policies", nargs="*", metavar="POLICY", help="policy files (default: the policy directory)")
        sp.add_argument("--trust-store", dest="trust_store", help="trust store directory")
        sp.add_argument("--catalog", dest="catalog_dir", help="service catalog directory")
        sp.add_argument("--state-dir", dest="state_dir", help="state directory")
        sp.add_argument("--now", type=_parse_now, help="evaluate at this time (ISO 8601 with zone) instead of the clock")
        sp.add_argument("--verbose", "-v", action="store_true", help="list every order, finding and change")

    sp = add("run", cmd_run, "run the daemon (systemd Type=notify; SIGHUP reloads, SIGTERM stops)", [config_only])
    sp.add_argument("--console", action="store_true", help="human-readable logs instead of JSON")
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    cfg = sub.add_parser("config", parents=[common], help="configuration commands")
    cfg_sub = cfg.add_subparsers(metavar="COMMAND")
    sp = cfg_sub.add_parser("check", parents=[common], help="validate the config and what it names")
    sp.set_defaults(func=cmd_config_check, command_name="config check")

    rpzp = sub.add_parser("rpz", parents=[common], help="RPZ primary commands")
    rpz_sub = rpzp.add_subparsers(metavar="COMMAND")
    sp = rpz_sub.add_parser("config", parents=[common], help="print the configuration of a resolver that consumes "
                            "blockd's RPZ zones (one stanza per zone, for the policies in force)")
    sp.add_argument("--for", dest="resolver", required=True, choices=("powerdns", "unbound", "bind", "knot"))
    sp.add_argument("--primary", help="HOST:PORT resolvers reach blockd at (default: enforcers.rpz.listen[0])")
    sp.add_argument("--resolver-dir", help="the resolver's directory for its copies of the zones")
    sp.add_argument("--refresh", type=int, default=1, help="PowerDNS: seconds between SOA polls (default 1)")
    sp.add_argument("policies", nargs="*", metavar="POLICY", help="policy files (default: the policy directory)")
    sp.add_argument("--trust-store", dest="trust_store", help="trust store directory")
    sp.add_argument("--catalog", dest="catalog_dir", help="service catalog directory")
    sp.add_argument("--state-dir", dest="state_dir", help="state directory")
    sp.add_argument("--now", type=_parse_now, help="evaluate at this time (ISO 8601 with zone) instead of the clock")
    sp.set_defaults(func=cmd_rpz_config, command_name="rpz config")

    att = sub.add_parser("attest", parents=[common], help="attestation commands")
    att_sub = att.add_subparsers(metavar="COMMAND")
    sp = att_sub.add_parser("verify", parents=[common], help="verify signed attestations (as `minisign -V` does, "
                            "plus the statement's shape)")
    sp.add_argument("--key", "-k", required=True, help="the operator's minisign public key")
    sp.add_argument("--signature-only", action="store_true",
                    help="check signatures and shape only, not that every enforcer holds its share")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.set_defaults(func=cmd_attest_verify, command_name="attest verify")

    aud = sub.add_parser("audit", parents=[common], help="audit log commands")
    aud_sub = aud.add_subparsers(metavar="COMMAND")
    sp = aud_sub.add_parser("verify", parents=[common], help="check the hash chain; say where it breaks")
    sp.add_argument("log", metavar="LOG", help="audit.jsonl")
    sp.add_argument("--attestation", "-a", action="append", help="also check against the head an attestation binds")
    sp.add_argument("--key", "-k", help="operator public key: verify the head's and attestations' signatures")
    sp.add_argument("--no-key", action="store_true",
                    help="check the hash chain only; the head stays unverified (exit 0 all the same)")
    sp.add_argument("--no-head", action="store_true", help="do not require the audit.head file")
    sp.set_defaults(func=cmd_audit_verify, command_name="audit verify")

    sp = add("compliance", cmd_compliance, "regulator: check operators' signed statements against the orders "
             "(exit 0 all comply, 1 some do not, 2 an input was refused, 3 only pending)")
    sp.add_argument("--policies", "-P", nargs="+", required=True, metavar="POLICY",
                    help="the regulator's signed policies (files or directories)")
    sp.add_argument("--operators", "-k", required=True, metavar="DIR",
                    help="operators' public keys: DIR/<operator>.pub or DIR/<operator>/*.pub")
    sp.add_argument("--statements", "-s", required=True, metavar="DIR",
                    help="the attestation files received (any tree; each is matched to its operator by key)")
    sp.add_argument("--trust-store", dest="trust_store", help="trust store for the regulator's own keys")
    sp.add_argument("--catalog", dest="catalog_dir", help="the regulator's service catalog directory")
    sp.add_argument("--max-age", type=_duration, default=_duration("25h"),
                    help="a latest statement older than this is stale (seconds, or 25h, 90m, 2d; default 25h)")
    sp.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    sp.add_argument("--prometheus", metavar="FILE", help="also write metrics for node_exporter's textfile "
                    "collector (alerts: monitoring/compliance_alerts.yml)")
    sp.add_argument("--now", type=_parse_now, help="evaluate at this time (ISO 8601 with zone) instead of the clock")
    sp.add_argument("--verbose", "-v", action="store_true", help="problems and evidence per cell")
    sp.add_argument("--quiet", "-q", action="store_true", help="only the one-line verdict")

    imp = sub.add_parser("import", help="registry formats -> an unsigned policy YAML for review and signing")
    imp_sub = imp.add_subparsers(metavar="FORMAT")

    def add_import(fmt: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        ip = imp_sub.add_parser(fmt, parents=[common], help=help, description=help)
        ip.set_defaults(func=cmd_import, format={"piracy-shield": "ps"}.get(fmt, fmt))
        ip.add_argument("--issuer", required=True, help="the issuer the policy will be signed as")
        ip.add_argument("--serial", required=True, type=int, help="policy serial (higher than the last one)")
        ip.add_argument("--issued-at", help="ISO 8601 with zone (default: now)")
        ip.add_argument("--not-before", help="default: issued-at")
        ip.add_argument("--not-after", help="default: not-before + --valid-days")
        ip.add_argument("--valid-days", type=int, default=365)
        ip.add_argument("--output", "-o", help="policy YAML to write (default: stdout; the report goes to stderr)")
        return ip

    ip = add_import("zi", "zapret-info dump.csv (cp1251, ip;domain;url;org;number;date): one order per decision")
    ip.add_argument("file", metavar="DUMP", help="dump.csv (or .csv.gz)")
    for fmt, help in (("list", "one entry a line (Re:filter, antifilter): domains and prefixes, one order"),
                      ("piracy-shield", "Piracy Shield FQDN / IPv4 / IPv6 exports of a ticket (JSON or text), "
                                        "checked against their SHA-256 files when given: one order")):
        ip = add_import(fmt, help)
        ip.add_argument("--order-id", required=True, help="the order id (e.g. the ticket id)")
        ip.add_argument("--authority", required=True, help="legal basis: the authority")
        ip.add_argument("--reference", required=True, help="legal basis: the decision's reference")
        ip.add_argument("--url", help="legal basis: a URL of the decision")
        if fmt == "list":
            ip.add_argument("file", metavar="LIST", help="the list (or .gz)")
            ip.add_argument("--action", choices=("block", "unblock"), default="block")
            ip.add_argument("--subtree", action="store_true", help="a plain name also covers everything below it")
            ip.add_argument("--syntax", choices=("plain", "clash", "dnsmasq"), default="plain",
                            help="the list as published for a tool: Clash rules (IP-CIDR,...) or dnsmasq "
                                 "server=/name/... lines")
        else:
            for kind in ("fqdn", "ipv4", "ipv6"):
                ip.add_argument(f"--{kind}", action="append", metavar="FILE", help=f"{kind.upper()} list export")
                ip.add_argument(f"--{kind}-sha256", action="append", metavar="FILE",
                                help=f"its checksum export (the n-th goes with the n-th --{kind})")

    sp = add("demo", cmd_demo, "run blockd on the signed sample policy in a lab of network namespaces (root)",
             [config_only])
    sp.add_argument("--verbose", "-v", action="store_true", help="print blockd's log at the end")
    return p


if __name__ == "__main__":
    sys.exit(main())
