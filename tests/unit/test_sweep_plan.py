"""The sweep's plan: sites and occurrences from an enumeration trace, the nth-call rule each run
installs, the site choices, and the statuses per leaf."""

from __future__ import annotations

import pytest

from harness.seam import abi
from harness.seam.abi import Leaf, Status
from harness.seam.faults import FaultPlan, FaultRule
from harness.seam.trace import TraceRecord
from harness.sweep.plan import SiteChoice, all_targets, choose, plan_runs, site_of
from harness.sweep.statuses import STATUSES, StatusClass, injections_for

RD = "read_sys_metadata_field+0x4b"


def record(seq: int, leaf: int, site: str | None, caller: str | None = None, status: int = 0) -> TraceRecord:
    return TraceRecord(seq=seq, time=0.0, boot=1, cpu=0, fn=leaf, leaf=abi.leaf_name(leaf), variant=0, inputs={},
                       outputs={}, status=status, status_name=abi.status_name(status), site=site, caller=caller)


def boot_like_trace() -> list[TraceRecord]:
    """SYS.INIT, LP.INIT on two CPUs (one site), two SYS.RD sites (one read twice), TDMR.INIT x3."""
    calls = [(Leaf.TDH_SYS_INIT, "try_init_module_global+0x62", "tdx_cpu_enable+0x25"),
             (Leaf.TDH_SYS_LP_INIT, "tdx_cpu_enable+0x58", "tdx_online_cpu+0x18"),
             (Leaf.TDH_SYS_LP_INIT, "tdx_cpu_enable+0x58", "tdx_online_cpu+0x18"),
             (Leaf.TDH_SYS_RD, RD, "get_tdx_sys_info_version+0x1d"),
             (Leaf.TDH_SYS_RD, RD, "tdx_enable+0x37c"),
             (Leaf.TDH_SYS_RD, RD, "tdx_enable+0x37c"),
             *[(Leaf.TDH_SYS_TDMR_INIT, "init_tdmr+0x4c", "tdx_enable+0xa78")] * 3,
             (Leaf.TDH_SYS_DISABLE, "tdx_sys_disable+0x20", None)]
    return [record(seq, leaf, site, caller) for seq, (leaf, site, caller) in enumerate(calls)]


def test_targets_count_occurrences_per_site_and_calls_per_leaf():
    targets = all_targets(boot_like_trace())
    rd = [t for t in targets if t.leaf == Leaf.TDH_SYS_RD]
    assert [(t.site.split(" < ")[1], t.occurrence, t.of, t.nth) for t in rd] == [
        ("get_tdx_sys_info_version+0x1d", 1, 1, 1), ("tdx_enable+0x37c", 1, 2, 2), ("tdx_enable+0x37c", 2, 2, 3)]
    assert [t.nth for t in targets if t.leaf == Leaf.TDH_SYS_TDMR_INIT] == [1, 2, 3]
    assert targets[-1].site == "tdx_sys_disable+0x20"  # no caller: the site alone
    assert targets[0].function == "try_init_module_global"


def test_the_nth_rule_fails_exactly_the_targeted_call():
    """The rule a run installs fires on the target's call and no other, as FaultPlan counts."""
    trace = boot_like_trace()
    for target in all_targets(trace):
        plan = FaultPlan([FaultRule(target.leaf, Status.TDX_SYS_BUSY, nth=target.nth, times=1)])
        counts: dict[int, int] = {}
        fired = []
        for r in trace:
            leaf = abi.leaf_key(r.fn)
            counts[leaf] = counts.get(leaf, 0) + 1
            if plan.match(leaf, counts[leaf], r.cpu, 0, 0) is not None:
                fired.append(r.seq)
        assert fired == [target.seq]


@pytest.mark.parametrize(("choice", "tdmr_occurrences"), [
    (SiteChoice.FIRST, [1]), (SiteChoice.FIRST_AND_LOOP, [1, 2, 3]), (SiteChoice.ALL, [1, 2, 3])])
def test_site_choices(choice, tdmr_occurrences):
    chosen = choose(all_targets(boot_like_trace()), choice)
    assert [t.occurrence for t in chosen if t.leaf == Leaf.TDH_SYS_TDMR_INIT] == tdmr_occurrences
    assert len({t.site for t in chosen}) == 6  # every site keeps its first call


def test_first_and_loop_takes_second_and_last_of_a_long_loop():
    trace = [record(i, Leaf.TDH_SYS_TDMR_INIT, "init_tdmr+0x4c", "tdx_enable+0xa78") for i in range(10)]
    assert [t.occurrence for t in choose(all_targets(trace), SiteChoice.FIRST_AND_LOOP)] == [1, 2, 10]


def test_runs_per_status_class_and_leaves_without_a_table():
    targets = choose(all_targets(boot_like_trace()), SiteChoice.FIRST)
    runs, unswept = plan_runs(targets)
    assert unswept == ["TDH.SYS.DISABLE"]
    assert len(runs) == sum(len(injections_for(t.leaf)) for t in targets)
    assert [r.index for r in runs] == list(range(len(runs)))
    busy, _ = plan_runs(targets, frozenset({"busy"}))
    assert {r.injection.klass for r in busy} == {StatusClass.BUSY}
    rule = runs[0].rule()
    assert (rule.leaf, rule.nth, rule.times, rule.status) == (Leaf.TDH_SYS_INIT, 1, 1, runs[0].injection.status)


def test_every_status_table_entry_is_a_module_status_with_its_source():
    for leaf, injections in STATUSES.items():
        assert injections, abi.leaf_name(leaf)
        assert len(set(injections)) == len(injections), abi.leaf_name(leaf)
        for injection in injections:
            assert not abi.status_name(injection.status).startswith("0x"), (abi.leaf_name(leaf), injection)
            assert injection.status != Status.TDX_SUCCESS
            assert injection.source.startswith(("src/", "the CPU")), injection.source


def test_a_record_without_a_site_is_named_by_its_leaf():
    assert site_of(record(0, Leaf.TDH_SYS_INIT, None)) == "TDH.SYS.INIT (no site)"
