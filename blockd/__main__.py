"""`blockd` command line: parse arguments, call the pipeline, print, exit.

Exit codes: 0 clean; 1 something was refused or is invalid; 2 usage error.
Every command takes `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from blockd import minisign, trust
from blockd.compile import Compilation, compile_policies
from blockd.errors import BlockdError
from blockd.fsutil import atomic_write
from blockd.intake import Context, Intake, load_context, policy_files, read_policies
from blockd.model import RuleSet, diff, union_intervals
from blockd.names import display
from blockd.policy import check_window, read_signed
from blockd.ranges import format_addr, subtract, to_cidrs
from blockd.settings import Settings, load_settings

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except BlockdError as e:
        _emit_error(args, e)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def _emit_error(args: argparse.Namespace, e: BlockdError) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
    else:
        print(f"blockd: error: {e}", file=sys.stderr)


def _now(args: argparse.Namespace) -> datetime:
    if args.now:
        when = datetime.fromisoformat(args.now)
        if when.tzinfo is None:
            raise SystemExit("blockd: error: --now needs a time zone, e.g. 2026-11-29T12:00:00Z")
        return when.astimezone(timezone.utc)
    return datetime.now(timezone.utc)


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
    for p in (pub, sec):
        if p.exists() and not args.force:
            raise SystemExit(f"blockd: error: {p} exists; use --force to overwrite")
    key = minisign.generate()
    atomic_write(sec, key.to_text().encode(), mode=0o600)
    atomic_write(pub, key.public.to_text(args.comment).encode())
    _out(args, {"key_id": key.public.id_hex, "public_key": str(pub), "secret_key": str(sec)},
         f"key {key.public.id_hex}: public {pub}, secret {sec} (mode 0600, unencrypted like `minisign -W`)")
    return EXIT_OK


def _secret_key(path: str) -> minisign.SecretKey:
    password = os.environ.get("BLOCKD_KEY_PASSWORD")
    return minisign.parse_secret_key(Path(path).read_text(), where=path,
                                     password=password.encode() if password is not None else None)


def cmd_sign(args: argparse.Namespace) -> int:
    key = _secret_key(args.sec)
    written = []
    for name in args.files:
        path = Path(name)
        data = path.read_bytes()
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
            _, v = read_signed(Path(name), store, role=args.role, max_bytes=1 << 30)
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


# -- check, plan, accept --------------------------------------------------------------------


def _intake(args: argparse.Namespace) -> tuple[Context, Intake, datetime]:
    settings = _settings(args)
    ctx = load_context(settings)
    paths = [Path(p) for p in args.policies] or policy_files(settings.policy_dir)
    now = _now(args)
    return ctx, read_policies(paths, ctx, now), now


def _accepted_ruleset(ctx: Context, now: datetime) -> tuple[list, RuleSet | None]:
    """The policies recorded in the state directory and what they compile to (None if none)."""
    from blockd.policy import load_policy

    policies = [load_policy(p, ctx.store) for p in ctx.state.accepted_paths() if p.exists()]
    if not policies:
        return [], None
    return policies, compile_policies(policies, ctx.catalog, ctx.compile, now).ruleset


def cmd_check(args: argparse.Namespace) -> int:
    ctx, intake, now = _intake(args)
    _, previous = _accepted_ruleset(ctx, now)
    comp = compile_policies(intake.accepted, ctx.catalog, ctx.compile, now, previous=previous)
    refused = bool(intake.rejected or intake.pending or comp.refused)
    report = _report(intake, comp, now)
    _out(args, report, _report_text(report, args.verbose))
    return EXIT_REFUSED if refused else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    ctx, intake, now = _intake(args)
    old_policies, previous = _accepted_ruleset(ctx, now)
    # The new state: each issuer's newest file replaces its accepted policy.
    by_issuer = {p.issuer: p for p in old_policies}
    by_issuer.update({p.issuer: p for p in intake.accepted})
    comp = compile_policies(list(by_issuer.values()), ctx.catalog, ctx.compile, now, previous=previous)
    old = previous or RuleSet.empty()
    plan = diff(old, comp.ruleset)
    # Show addresses, not enforcer elements: /24 -> /25 reads as "remove the other /25".
    def addrs(v: int, a: RuleSet, b: RuleSet) -> list[str]:
        fam = "v4" if v == 4 else "v6"
        only = subtract(union_intervals(getattr(a, fam)), union_intervals(getattr(b, fam)))
        return [f"{format_addr(v, n)}/{p}" for n, p in to_cidrs(v, only)]

    data = {
        "from_digest": old.digest,
        "to_digest": comp.ruleset.digest,
        "add": {"domains": [display(*d) for d in plan.add_domains], "ipv4": addrs(4, comp.ruleset, old),
                "ipv6": addrs(6, comp.ruleset, old)},
        "remove": {"domains": [display(*d) for d in plan.del_domains], "ipv4": addrs(4, old, comp.ruleset),
                   "ipv6": addrs(6, old, comp.ruleset)},
        "rejected": [{"file": r.path, "error": str(r.error)} for r in intake.rejected],
        "refused": [str(f) for f in comp.refused],
    }
    lines = [f"plan {data['from_digest'][:12]} -> {data['to_digest'][:12]}"]
    for verb, sign in (("add", "+"), ("remove", "-")):
        for kind in ("domains", "ipv4", "ipv6"):
            items = data[verb][kind]  # type: ignore[index]
            shown = items if args.verbose else items[:20]
            lines += [f"  {sign} {kind}: {x}" for x in shown]
            if len(items) > len(shown):
                lines.append(f"  {sign} {kind}: … {len(items) - len(shown)} more (--verbose)")
    lines += [f"rejected: {r['error']}" for r in data["rejected"]]  # type: ignore[index]
    lines += [f"refused: {f}" for f in data["refused"]]  # type: ignore[union-attr]
    _out(args, data, "\n".join(lines))
    return EXIT_REFUSED if intake.rejected or comp.refused else EXIT_OK


def cmd_accept(args: argparse.Namespace) -> int:
    """Record policies as accepted (replay protection and restore copies); the daemon does this too."""
    ctx, intake, now = _intake(args)
    done = []
    for policy in intake.accepted:
        path = Path(policy.source)
        data = path.read_bytes()
        sigs = [(str(p), p.read_bytes()) for p in trust.signature_paths(path)]
        rec = ctx.state.record(policy, data, sigs, now)
        done.append({"issuer": rec.issuer, "serial": rec.serial, "digest": rec.digest})
    text = "\n".join([f"accepted {d['issuer']} serial {d['serial']}" for d in done] +
                     [f"rejected: {r.error}" for r in intake.rejected] +
                     [f"pending: {p.source}: not before {p.not_before:%Y-%m-%dT%H:%M:%SZ}" for p in intake.pending])
    _out(args, {"accepted": done, "rejected": [str(r.error) for r in intake.rejected]}, text)
    return EXIT_REFUSED if intake.rejected or intake.pending else EXIT_OK


def _report(intake: Intake, comp: Compilation, now: datetime) -> dict[str, object]:
    rs = comp.ruleset
    pending = []
    for p in intake.pending:
        try:
            check_window(p, now)
        except BlockdError as e:
            pending.append({"file": p.source, "error": str(e)})
    return {
        "ok": not (intake.rejected or intake.pending or comp.refused),
        "digest": rs.digest,
        "counts": rs.counts(),
        "policies": [{"file": p.source, "issuer": p.issuer, "serial": p.serial, "orders": len(p.orders),
                      "signers": list(p.signers)} for p in intake.accepted],
        "rejected": [{"file": r.path, "reason": r.reason, "error": str(r.error)} for r in intake.rejected] + pending,
        "orders": [{"order": k, "status": o.status, "rules": o.rules, "refused": o.refused}
                   for k, o in sorted(comp.orders.items())],
        "findings": [{"order": f.order_id, "rule": f.rule, "guard": f.guard, "allowed": f.allowed,
                      "reason": f.reason} for f in comp.findings],
        "warnings": list(comp.warnings),
    }


def _report_text(r: dict, verbose: bool) -> str:
    c = r["counts"]
    lines = [f"rule set {r['digest'][:16]}: {c['domain_exact']} exact names, {c['domain_subtree']} subtrees, "
             f"{c['ipv4_ranges']} IPv4 ranges, {c['ipv6_ranges']} IPv6 ranges"]
    lines += [f"policy {p['file']}: issuer {p['issuer']} serial {p['serial']}, {p['orders']} orders, "
              f"signed by {', '.join(p['signers'])}" for p in r["policies"]]
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
    lines += [f"REJECTED {x['error']}" for x in r["rejected"]]
    lines.append("OK" if r["ok"] else "REFUSED: see above")
    return "\n".join(lines)


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


def cmd_config_check(args: argparse.Namespace) -> int:
    """Load the config and everything it names; every problem is reported at once."""
    settings = _settings(args)
    ctx = load_context(settings)
    e = settings.enforcers
    enabled = [n for n in ("nft", "ipset", "dns", "rpz", "bgp") if getattr(e, n) is not None]
    data = {"ok": True, "config": settings.source, "enforcers": enabled, "issuers": sorted(ctx.store.issuers),
            "services": sorted(ctx.catalog.services), "policy_dir": str(settings.policy_dir)}
    _out(args, data, f"{settings.source}: OK; enforcers {', '.join(enabled) or 'none'}; issuers "
                     f"{', '.join(data['issuers'])}; {len(data['services'])} services in the catalog")
    return EXIT_OK


def cmd_attest_verify(args: argparse.Namespace) -> int:
    """docs/attestation.md "How to verify", steps 1-5: signature, shape, every enforcer holds
    its share as read back, and (for several files) the statement chain has no gap."""
    import hashlib

    from blockd import attest

    key = minisign.parse_public_key(Path(args.key).read_text(), where=args.key)
    results, worst = [], EXIT_OK
    signed = []
    for name in args.files:
        try:
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
    key = minisign.parse_public_key(Path(args.key).read_text(), where=args.key) if args.key else None
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


def cmd_demo(args: argparse.Namespace) -> int:
    from blockd.demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockd", description=__doc__.splitlines()[0] if __doc__ else None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="blockd.yaml (default: the checkout's policies/ layout)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:  # noqa: A002
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("keygen", cmd_keygen, "create an Ed25519 key pair in minisign format")
    sp.add_argument("--pub", "-p", required=True, help="public key file to write (.pub)")
    sp.add_argument("--sec", "-s", required=True, help="secret key file to write (mode 0600)")
    sp.add_argument("--comment", help="untrusted comment for the public key")
    sp.add_argument("--force", "-f", action="store_true", help="overwrite existing files")

    sp = add("sign", cmd_sign, "write detached minisign signatures (FILE.minisig) for files")
    sp.add_argument("--sec", "-s", required=True, help="secret key (password in $BLOCKD_KEY_PASSWORD if encrypted)")
    sp.add_argument("--trusted-comment", "-t", help="signed comment (default: timestamp and file name)")
    sp.add_argument("--name", help="write FILE.NAME.minisig, for several signers of one file")
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
        sp.add_argument("--now", help="evaluate at this time (ISO 8601 with zone) instead of the clock")
        sp.add_argument("--verbose", "-v", action="store_true", help="list every order, finding and change")

    sp = add("run", cmd_run, "run the daemon (systemd Type=notify; SIGHUP reloads, SIGTERM stops)")
    sp.add_argument("--console", action="store_true", help="human-readable logs instead of JSON")
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(metavar="COMMAND")
    sp = cfg_sub.add_parser("check", parents=[common], help="validate the config and what it names")
    sp.set_defaults(func=cmd_config_check)

    att = sub.add_parser("attest", help="attestation commands")
    att_sub = att.add_subparsers(metavar="COMMAND")
    sp = att_sub.add_parser("verify", parents=[common], help="verify signed attestations (as `minisign -V` does, "
                            "plus the statement's shape)")
    sp.add_argument("--key", "-k", required=True, help="the operator's minisign public key")
    sp.add_argument("--signature-only", action="store_true",
                    help="check signatures and shape only, not that every enforcer holds its share")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.set_defaults(func=cmd_attest_verify)

    aud = sub.add_parser("audit", help="audit log commands")
    aud_sub = aud.add_subparsers(metavar="COMMAND")
    sp = aud_sub.add_parser("verify", parents=[common], help="check the hash chain; say where it breaks")
    sp.add_argument("log", metavar="LOG", help="audit.jsonl")
    sp.add_argument("--attestation", "-a", action="append", help="also check against the head an attestation binds")
    sp.add_argument("--key", "-k", help="operator public key: verify the head's and attestations' signatures")
    sp.add_argument("--no-key", action="store_true",
                    help="check the hash chain only; the head stays unverified (exit 0 all the same)")
    sp.add_argument("--no-head", action="store_true", help="do not require the audit.head file")
    sp.set_defaults(func=cmd_audit_verify)

    sp = add("demo", cmd_demo, "run blockd on the signed sample policy in a lab of network namespaces (root)")
    sp.add_argument("--verbose", "-v", action="store_true", help="print blockd's log at the end")
    return p


if __name__ == "__main__":
    sys.exit(main())
