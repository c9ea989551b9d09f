"""plan_repair: how the job goes on after failures (pure)."""

from ulfmpy.recovery import Member, plan_repair


def members(logicals, spares=()):
    out = [Member(uid=r, logical=r, ckpt_step=10) for r in logicals]
    out += [Member(uid=u, logical=None, ckpt_step=None) for u in spares]
    return out


def test_spares_take_the_dead_ranks_places():
    plan = plan_repair(members([0, 1, 3], spares=[4, 5]), size=4, policies=("spares", "shrink"))
    assert plan.policy == "spares" and plan.failed == (2,)
    assert plan.assign[4] == 2 and plan.assign[5] is None and plan.size == 4
    assert plan.replaced == {2: 4}
    assert all(plan.assign[r] == r for r in (0, 1, 3))


def test_not_enough_spares_falls_to_shrink():
    plan = plan_repair(members([0, 3], spares=[4]), size=4, policies=("spares", "shrink"))
    assert plan.policy == "shrink" and plan.failed == (1, 2) and plan.size == 2
    assert plan.assign[0] == 0 and plan.assign[3] == 1 and plan.assign[4] is None


def test_respawn_only_when_possible():
    m = members([0, 1, 3])
    assert plan_repair(m, size=4, policies=("respawn",)) is None
    assert plan_repair(m, size=4, policies=("respawn",), spawn_ok=True).policy == "respawn"


def test_nothing_applies():
    assert plan_repair(members([0, 1, 3]), size=4, policies=("spares",)) is None
    assert plan_repair(members([0, 1, 3]), size=4, policies=()) is None


def test_dead_spare_alone_needs_no_replacement():
    # only a spare died: nobody failed, spares policy does not apply, shrink keeps everyone
    plan = plan_repair(members([0, 1, 2, 3], spares=[5]), size=4, policies=("spares", "shrink"))
    assert plan.policy == "shrink" and plan.failed == () and plan.size == 4
    assert [plan.assign[r] for r in range(4)] == [0, 1, 2, 3]
