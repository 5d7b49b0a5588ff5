"""A reconcile pass on the dry-run enforcer: a bad new input is refused alone, the rest stays."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd import minisign
from blockd.enforcers.dryrun import DryRunEnforcer
from blockd.reconcile import PassResult, Reconciler
from blockd.settings import GuardSettings, Settings
from tests.conftest import ROOT, Keys

NOW = datetime(2026, 11, 29, tzinfo=timezone.utc)
POLICY = """\
issuer: reg
serial: {serial}
issued_at: 2026-11-01T00:00:00Z
not_before: 2026-11-01T00:00:00Z
not_after: 2030-01-01T00:00:00Z
orders:
  - id: o{serial}
    legal_basis: {{authority: Court, reference: R{serial}}}
    action: block
    targets: {{{targets}}}
"""


@pytest.fixture
def settings(tmp_path: Path, keys: Keys, catalog_dir: Path) -> Settings:
    (tmp_path / "policies").mkdir(exist_ok=True)
    return Settings(trust_store=keys.trust, policy_dir=tmp_path / "policies", catalog_dir=catalog_dir,
                    prefix_table=tmp_path / "prefix2as.txt", shared_infra_dir=ROOT / "policies" / "shared-infra",
                    state_dir=tmp_path / "state")


def run_pass(rec: Reconciler) -> PassResult:
    return asyncio.run(rec.run_pass(now=NOW))


def held(rec: Reconciler) -> tuple[int, int]:
    rs = rec.enforcers[0]._held  # type: ignore[attr-defined]
    return len(rs.domains), len(rs.v4) + len(rs.v6)


@pytest.mark.parametrize("bad_targets, error", [
    ("services: [telegramm]", "unknown service 'telegramm'"),
    ("asns: [64512]", "AS64512 has no prefixes"),
    ("services: [telegram], asns: [AS64999]", "AS64999 has no prefixes"),
])
def test_a_bad_new_serial_is_refused_alone(settings: Settings, write_policy, bad_targets: str, error: str) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="services: [telegram]"), name="p-1.yaml")
    first = run_pass(rec)
    assert [p.serial for p in first.policies] == [1]
    before = first.compilation.ruleset.digest
    enforced = held(rec)
    assert enforced[0] > 0 and enforced[1] > 0

    write_policy(POLICY.format(serial=2, targets=bad_targets), name="p-2.yaml")
    second = run_pass(rec)
    assert [p.serial for p in second.policies] == [1], "the issuer keeps its last good policy"
    assert second.compilation.ruleset.digest == before and held(rec) == enforced
    assert second.compilation.orders["reg/o1"] == first.compilation.orders["reg/o1"]
    (rej,) = second.rejected
    assert rej.path.endswith("p-2.yaml") and rej.reason == "expand" and error in str(rej.error)
    assert rej.sha256 is not None and len(rej.sha256) == 64
    assert {(v.source.rsplit("/", 1)[-1], v.status) for v in second.verdicts} == {("p-1.yaml", "active"),
                                                                                 ("p-2.yaml", "rejected")}
    # reported once, not on every pass while the file lies there
    assert run_pass(rec).rejected == ()

    # a restart (new process, state only) enforces serial 1, and still refuses serial 2
    again = Reconciler(settings, [DryRunEnforcer("nft")])
    third = run_pass(again)
    assert [p.serial for p in third.policies] == [1] and third.compilation.ruleset.digest == before
    assert held(again) == enforced
    (settings.policy_dir / "p-1.yaml").unlink()  # the state's copy carries it on its own
    assert [p.serial for p in run_pass(Reconciler(settings, [DryRunEnforcer("nft")])).policies] == [1]


def test_older_serials_in_the_directory_are_superseded_not_rejections(settings: Settings, write_policy) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    run_pass(rec)
    write_policy(POLICY.format(serial=2, targets="domains: [b.example]"), name="p-2.yaml")
    for _ in range(3):
        r = run_pass(rec)
        assert r.rejected == ()
        assert sorted((Path(v.source).name, v.status) for v in r.verdicts) == [("p-1.yaml", "superseded"),
                                                                              ("p-2.yaml", "active")]


def test_the_state_records_exactly_the_verified_bytes(settings: Settings, write_policy) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    path = write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    signed = path.read_bytes()
    run_pass(rec)
    copy = settings.state_dir / "policies" / "reg" / "1.yaml"
    assert copy.read_bytes() == signed
    from blockd.policy import SignedFile
    from blockd.trust import Verified

    p = rec.select(rec.ctx, NOW).prepared[0].policy  # type: ignore[arg-type]
    with pytest.raises(Exception, match="not the verified ones"):
        rec.ctx.state.commit([(replace(p, serial=2), SignedFile(b"other", (), Verified("reg", ())))], NOW)  # type: ignore[union-attr]


def test_new_serials_written_ahead_leave_exactly_the_accepted_copy(settings: Settings, write_policy,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new serial's copy is written ahead of its commit (the threshold set to 0), but on
    the first pass (every file is read then): an accepted one is renamed into place with the
    verified bytes, a refused one leaves nothing."""
    from blockd import state as state_mod
    monkeypatch.setattr(state_mod, "STAGE_BYTES", 0)
    placed: list[bool] = []
    place = state_mod.StateStore._place_staged
    monkeypatch.setattr(state_mod.StateStore, "_place_staged",
                        lambda self, *a: placed.append(place(self, *a)) or placed[-1])
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    reg = settings.state_dir / "policies" / "reg"
    for serial, targets, accepted in [(1, "domains: [a.example]", 1), (2, "domains: [b.example]", 2),
                                      (3, "services: [telegramm]", 2), (4, "domains: [c.example]", 4)]:
        path = write_policy(POLICY.format(serial=serial, targets=targets), name="p.yaml")
        r = run_pass(rec)
        assert [p.serial for p in r.policies] == [accepted]
        assert sorted(f.name for f in reg.iterdir()) == [f"{accepted}.yaml", f"{accepted}.yaml.0.minisig"]
        if accepted == serial:
            assert (reg / f"{serial}.yaml").read_bytes() == path.read_bytes()
            # the copy written ahead was renamed into place (none on the first pass)
            assert (placed[-1] is True) if serial > 1 else (placed == [False])
        state_mod._stager.submit(lambda: None).result()  # one worker, in order: a discarded write is done
        staging = settings.state_dir / "staging"
        assert not staging.exists() or list(staging.iterdir()) == []  # a refused one's is gone
    assert [p.serial for p in run_pass(Reconciler(settings, [DryRunEnforcer("nft")])).policies] == [4]


def test_growth_guard_baseline_survives_a_restart(settings: Settings, write_policy) -> None:
    s = replace(settings, guards=GuardSettings(growth_floor=2, growth_factor=2.0))
    rec = Reconciler(s, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="domains: [a.example, b.example, c.example]"), name="p-1.yaml")
    run_pass(rec)
    many = ", ".join(f"n{i}.example" for i in range(20))
    write_policy(POLICY.format(serial=2, targets=f"domains: [{many}]"), name="p-2.yaml")
    restarted = Reconciler(s, [DryRunEnforcer("nft")])  # no rule set in memory: the baseline is on disk
    r = run_pass(restarted)
    assert r.compilation.orders["reg/o2"].status == "refused"
    assert any(f.guard == "growth" and "from 3 to" in f.reason for f in r.compilation.findings)


def test_an_untrusted_catalog_keeps_the_last_good_one_even_after_a_restart(settings: Settings, write_policy,
                                                                             catalog_dir: Path) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="services: [telegram]"), name="p-1.yaml")
    good = run_pass(rec).compilation.ruleset.digest
    # an attacker (or a mistake) replaces a catalog file, signed by a key nobody trusts
    svc = catalog_dir / "telegram.yaml"
    svc.write_text(svc.read_text().replace("telegram.org", "example.org"))
    svc.with_name("telegram.yaml.minisig").write_text(minisign.sign(svc.read_bytes(), minisign.generate()))
    r = run_pass(rec)
    assert r.compilation.ruleset.digest == good
    (failure,) = r.new_input_failures
    assert failure.input == "catalog" and failure.where.endswith("catalog/telegram.yaml")
    assert "is not in the trust store" in failure.message and "last good catalog" in failure.message
    # restart: nothing in memory, the state's copy of the catalog is used (and verified)
    again = Reconciler(settings, [DryRunEnforcer("nft")])
    r2 = run_pass(again)
    assert r2.compilation.ruleset.digest == good and [p.serial for p in r2.policies] == [1]
    assert r2.input_failures[0].input == "catalog" and "state copy" in r2.input_failures[0].message


def test_a_broken_key_file_does_not_stop_a_restart(settings: Settings, write_policy, keys: Keys) -> None:
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    (keys.trust / "reg" / "zz-new.pub").write_text("untrusted comment: half a key\nRWQ\n")
    r = run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    assert [p.serial for p in r.policies] == [1]
    assert [f.input for f in r.input_failures] == ["trust_store"] and "zz-new.pub" in r.input_failures[0].where


@pytest.mark.parametrize("kind", ["fifo", "devzero", "directory"])
def test_non_regular_policy_files_are_refused_without_reading(settings: Settings, write_policy, kind: str) -> None:
    import os

    target = settings.policy_dir / "odd.yaml"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "devzero":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    r = run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    assert [p.serial for p in r.policies] == [1]
    (rej,) = r.rejected
    assert rej.path.endswith("odd.yaml") and "not a regular file" in str(rej.error)


def test_ipv4_mapped_addresses_are_enforced_as_ipv4(settings: Settings, write_policy) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="cidrs: ['::ffff:149.154.167.50', '::ffff:0:0/96']"),
                 name="p-1.yaml")
    r = run_pass(rec)
    rs = r.compilation.ruleset
    assert len(rs.v6) == 0 and [(x.first, x.last) for x in rs.v4] == [(0x959AA732, 0x959AA732)]
    assert any(f.rule == "0.0.0.0/0" and f.guard == "min_prefix" for f in r.compilation.refused)


def test_shutil_copy_of_state_is_enough_to_restore(settings: Settings, write_policy, tmp_path: Path) -> None:
    """The state directory alone (backed up and restored elsewhere) restores what was in force."""
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    moved = tmp_path / "restored-state"
    shutil.copytree(settings.state_dir, moved)
    shutil.rmtree(settings.policy_dir)
    r = run_pass(Reconciler(replace(settings, state_dir=moved), [DryRunEnforcer("nft")]))
    assert [p.serial for p in r.policies] == [1]


def test_a_state_that_cannot_be_written_holds_the_new_serial_back(settings: Settings, write_policy) -> None:
    """Nothing is applied before it is recorded: serial 1 stays, serial 2 waits (pending, kind state),
    and the next pass once the write works takes it."""
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    before = run_pass(rec).compilation.ruleset.digest
    blocker = settings.state_dir / "policies" / "reg" / "2.yaml"
    blocker.mkdir()  # a real fault: the copy cannot be renamed into place (EISDIR)
    write_policy(POLICY.format(serial=2, targets="domains: [b.example]"), name="p-2.yaml")
    r = run_pass(rec)
    assert [p.serial for p in r.policies] == [1] and r.compilation.ruleset.digest == before
    assert r.state_error is not None and "Is a directory" in r.state_error
    waiting = [v for v in r.verdicts if v.serial == 2]
    assert [(v.status, v.kind) for v in waiting] == [("pending", "state")]
    assert "not in force until the state directory records it" in waiting[0].reason
    assert r.compilation.orders["reg/o2"].status == "pending"
    assert [f.input for f in r.new_input_failures] == ["state"]
    import json as _json

    assert _json.loads((settings.state_dir / "accepted.json").read_text())["reg"]["serial"] == 1
    # a restart while the state still cannot be written serves what it holds
    restarted = run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    assert [p.serial for p in restarted.policies] == [1] and restarted.state_error is not None
    blocker.rmdir()
    r = run_pass(rec)
    assert [p.serial for p in r.policies] == [2] and r.state_error is None
    assert _json.loads((settings.state_dir / "accepted.json").read_text())["reg"]["serial"] == 2


def test_a_pass_with_nothing_changed_reuses_the_parse_the_expansion_and_the_merge(settings: Settings,
                                                                                  write_policy) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="services: [telegram]"), name="p-1.yaml")
    first = run_pass(rec)
    again = run_pass(rec)
    assert again.policies[0] is first.policies[0], "an unchanged file is verified again, not parsed again"
    assert again.compilation is first.compilation, "the same inputs are not merged again"
    assert not again.changed
    write_policy(POLICY.format(serial=2, targets="services: [telegram]"), name="p-2.yaml")
    third = run_pass(rec)
    assert third.compilation is not first.compilation and [p.serial for p in third.policies] == [2]
    # the file's bytes are still checked on every pass: a tampered file is refused at once
    path = settings.policy_dir / "p-2.yaml"
    before = rec._merger.prepared[0]
    path.write_text(path.read_text().replace("R2", "R3"))
    fourth = run_pass(rec)
    assert [p.serial for p in fourth.policies] == [2] and fourth.policies[0].source.startswith(str(settings.state_dir))
    # the state's copy (the same bytes) takes over without expanding or merging anything again
    now_in_force = rec._merger.prepared[0]
    assert now_in_force.policy.source != before.policy.source and now_in_force.blocks is before.blocks
    assert now_in_force.prior == before.policy.digest and not now_in_force.changed and rec._merger.path == "delta"
    assert any(v.source.endswith("p-2.yaml") and v.status == "rejected" and v.kind == "signature"
               for v in fourth.verdicts)


def _enforced(r: PassResult) -> tuple[int, ...]:
    return tuple(p.serial for p in r.policies)


@pytest.mark.parametrize("edit", [
    "a copy of the issuer's key under another issuer",
    "an unknown key in issuer.yaml",
    "issuer.yaml removed",
    "issuer.yaml replaced by a directory",
])
def test_a_bad_trust_store_edit_keeps_the_issuer(settings: Settings, write_policy, keys: Keys, edit: str) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    good = run_pass(rec).compilation.ruleset.digest
    reg = keys.trust / "reg"
    if edit.startswith("a copy"):
        (keys.trust / "aaa").mkdir()
        shutil.copy(reg / "k0.pub", keys.trust / "aaa" / "k0.pub")
        (keys.trust / "aaa" / "issuer.yaml").write_text("roles: [policy]\n")
    elif edit.startswith("an unknown"):
        (reg / "issuer.yaml").write_text("threshold: 1\nroles: [policy]\nextra: 1\n")
    elif edit == "issuer.yaml removed":
        (reg / "issuer.yaml").unlink()
    else:
        (reg / "issuer.yaml").unlink()
        (reg / "issuer.yaml").mkdir()
    r = run_pass(rec)
    assert _enforced(r) == (1,) and r.compilation.ruleset.digest == good, edit
    assert any(f.input == "trust_store" and "last good keys" in f.message for f in r.input_failures), r.input_failures
    # and after a restart, from the state's copy of the last good trust store
    again = run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    assert _enforced(again) == (1,) and again.compilation.ruleset.digest == good, edit


@pytest.mark.parametrize("how", ["removed", "service renamed by a signed update"])
def test_a_catalog_that_cannot_expand_an_accepted_policy_is_refused(settings: Settings, write_policy, keys: Keys,
                                                                    catalog_dir: Path, how: str) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="services: [telegram]"), name="p-1.yaml")
    good = run_pass(rec).compilation.ruleset.digest
    svc = catalog_dir / "telegram.yaml"
    if how == "removed":
        svc.unlink()
        svc.with_name("telegram.yaml.minisig").unlink()
    else:
        renamed = catalog_dir / "telegram-messenger.yaml"
        renamed.write_text(svc.read_text().replace("service: telegram", "service: telegram-messenger"))
        keys.sign(renamed, keys.operator)
        svc.unlink()
        svc.with_name("telegram.yaml.minisig").unlink()
    r = run_pass(rec)
    assert _enforced(r) == (1,) and r.compilation.ruleset.digest == good
    (failure,) = [f for f in r.input_failures if f.input == "catalog"]
    assert "cannot expand the accepted policy" in failure.message and "unknown service 'telegram'" in failure.message
    # after a restart the state's copy of the last good catalog is used
    again = run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))
    assert _enforced(again) == (1,) and again.compilation.ruleset.digest == good
    assert any(f.input == "catalog" and "state copy" in f.message for f in again.input_failures)


def test_plan_shows_what_the_daemon_will_do_when_the_catalog_breaks(settings: Settings, write_policy,
                                                                    catalog_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json as _json

    from blockd.__main__ import main

    write_policy(POLICY.format(serial=1, targets="services: [telegram]"), name="p-1.yaml")
    run_pass(Reconciler(settings, [DryRunEnforcer("nft")]))  # the daemon ran: the state has the catalog's copy
    (catalog_dir / "telegram.yaml").unlink()
    capsys.readouterr()  # the pass's own log lines
    config = tmp_path / "c.yaml"
    config.write_text(f"trust_store: {settings.trust_store}\npolicy_dir: {settings.policy_dir}\n"
                      f"catalog_dir: {catalog_dir}\nprefix_table: {settings.prefix_table}\n"
                      f"shared_infra_dir: {settings.shared_infra_dir}\nstate_dir: {settings.state_dir}\n")
    main(["plan", "--config", str(config), "--json"])
    plan = _json.loads(capsys.readouterr().out)
    assert plan["remove"] == {"domains": [], "ipv4": [], "ipv6": []} and plan["from_digest"] == plan["to_digest"]
    assert any(f["input"] == "catalog" and "cannot expand the accepted policy" in f["error"]
               for f in plan["input_failures"])


TWO = """\
issuer: reg
serial: {serial}
issued_at: 2026-11-01T00:00:00Z
not_before: 2026-11-01T00:00:00Z
not_after: 2030-01-01T00:00:00Z
orders:
  - id: big
    legal_basis: {{authority: Court, reference: R1}}
    action: block
    targets: {{services: [telegram]}}
  - id: small
    legal_basis: {{authority: Court, reference: R2}}
    action: block
    targets: {{domains: [{name}]}}
"""


def test_a_new_serial_expands_only_the_orders_that_changed(settings: Settings, write_policy) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(TWO.format(serial=1, name="a.example"), name="p-1.yaml")
    run_pass(rec)
    big1 = dict(rec.select(rec.ctx, NOW).prepared[0].blocks)["reg/big"]  # type: ignore[arg-type]
    write_policy(TWO.format(serial=2, name="b.example"), name="p-2.yaml")
    r = run_pass(rec)
    assert [p.serial for p in r.policies] == [2]
    blocks = dict(rec.select(rec.ctx, NOW).prepared[0].blocks)  # type: ignore[arg-type]
    assert blocks["reg/big"] is big1, "the unchanged order is not expanded and guarded again"
    assert blocks["reg/small"].domains == ("b.example",)
    # prepared beside serial 1, it names its one changed order: the merge looks at that one only
    new = rec._merger.prepared[0]
    assert new.prior is not None and set(new.changed) == {"reg/small"} and rec._merger.path == "delta"

class RecordingEnforcer(DryRunEnforcer):
    """The dry-run enforcer, remembering the change each apply was given."""

    def __init__(self, name: str = "nft") -> None:
        super().__init__(name)
        self.changes: list[object] = []

    async def apply(self, desired, change=None):  # type: ignore[no-untyped-def]
        self.changes.append(change)
        return await super().apply(desired, change)


def test_the_change_is_diffed_once_and_given_to_every_enforcer(settings: Settings, write_policy) -> None:
    """Issue 14: the reconciler hands each enforcer the plan from the rule set it applied last."""
    from blockd.model import Change, diff, rule_delta

    a, b = RecordingEnforcer("nft"), RecordingEnforcer("dns")
    rec = Reconciler(settings, [a, b])
    write_policy(POLICY.format(serial=1, targets="domains: [one.example], cidrs: [192.0.2.0/24]"), name="p-1.yaml")
    first = run_pass(rec).compilation.ruleset
    assert a.changes == b.changes == [None]  # nothing applied before: the full desired state
    write_policy(POLICY.format(serial=2, targets="domains: [two.example], cidrs: [198.51.100.0/24]"), name="p-2.yaml")
    second = run_pass(rec).compilation.ruleset
    change = a.changes[-1]
    assert isinstance(change, Change) and change is b.changes[-1]
    assert change.base == first.digest and change.plan == diff(first, second)
    assert (change.removed, change.added) == rule_delta(first, second)
    assert rec._merger.path == "delta"  # the change came from the merge by delta, not from a diff
    assert change.plan.add_domains == (("two.example", False),) and change.plan.del_domains == (("one.example", False),)
    run_pass(rec)  # nothing changed: an empty plan from what is held
    last = a.changes[-1]
    assert last.base == second.digest and last.plan == diff(second, second) and last.plan.empty
    assert last.removed is not None and last.added is not None and not len(last.removed) and not len(last.added)


def test_a_state_that_cannot_be_written_holds_back_every_unrecorded_serial(settings: Settings, write_policy) -> None:
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    write_policy(POLICY.format(serial=1, targets="domains: [a.example]"), name="p-1.yaml")
    before = run_pass(rec).compilation.ruleset.digest
    for serial in (2, 3):
        (settings.state_dir / "policies" / "reg" / f"{serial}.yaml").mkdir()  # neither can be recorded
        write_policy(POLICY.format(serial=serial, targets=f"domains: [n{serial}.example]"), name=f"p-{serial}.yaml")
    r = run_pass(rec)
    assert [p.serial for p in r.policies] == [1] and r.compilation.ruleset.digest == before
    assert sorted(v.serial for v in r.verdicts if v.kind == "state") == [2, 3]


@pytest.mark.parametrize("first", ["signature", "file"])
def test_a_new_serial_whose_two_files_landed_apart_still_reuses_the_last_parse(settings: Settings, write_policy,
                                                                               first: str) -> None:
    """The next serial's signature (or its file) lands before the other: for one pass the
    directory's file fails to verify and the state's copy stands in; the new serial then
    parses beside the last parse (its unchanged orders are the same objects) and merges by
    its changed order alone."""
    rec = Reconciler(settings, [DryRunEnforcer("nft")])
    path = write_policy(TWO.format(serial=1, name="a.example"))
    run_pass(rec)
    first_prep = rec._merger.prepared[0]
    other = write_policy(TWO.format(serial=2, name="b.example"), name="../next.yaml")  # beside, not in, the directory
    if first == "signature":
        shutil.copy(other.with_name("next.yaml.minisig"), path.with_name("p.yaml.minisig"))
    else:
        shutil.copy(other, path)
    between = run_pass(rec)
    assert [p.serial for p in between.policies] == [1]
    assert between.policies[0].source.startswith(str(settings.state_dir))
    assert any(v.status == "rejected" and v.kind == "signature" for v in between.verdicts)
    shutil.copy(other, path)
    shutil.copy(other.with_name("next.yaml.minisig"), path.with_name("p.yaml.minisig"))
    other.unlink()
    other.with_name("next.yaml.minisig").unlink()
    r = run_pass(rec)
    assert [p.serial for p in r.policies] == [2]
    new = rec._merger.prepared[0]
    assert new.policy.orders[0] is first_prep.policy.orders[0], "the unchanged order was parsed again"
    assert set(new.changed) == {"reg/small"} and rec._merger.path == "delta"
