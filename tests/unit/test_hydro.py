"""The hydro app on one rank: the Sedov shock where theory puts it, total
energy conserved to rounding, and the mesh it holds."""

from __future__ import annotations

import numpy as np
import pytest

from apps.hydro import Hydro, HydroSpec, make_mesh, sedov_radius, span


class OneRank:
    """A communicator of one rank: its Allreduce is a copy, and it sends nothing."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Allreduce(self, send, recv, op=None) -> None:
        np.copyto(recv, send)


def _run_to(h: Hydro, t_end: float, max_steps: int = 5000) -> int:
    steps = 0
    while h.t[0] < t_end and steps < max_steps:
        h.step()
        steps += 1
    return steps


def test_the_sedov_shock_is_where_theory_puts_it():
    """The density peak along every ray at t = 0.5 lies within 5 % of the
    cylindrical Sedov radius (1.004 (E t^2 / rho)^(1/4), E the full blast's
    energy: four times the quarter's)."""
    spec = HydroSpec(zones=16)
    h = Hydro(OneRank(), spec)
    _run_to(h, 0.5)
    t = float(h.t[0])
    assert t >= 0.5 and h.invariant()
    rho, c = h.density(), h.zone_centres()
    r, angle = np.hypot(c[:, 0], c[:, 1]), np.arctan2(c[:, 1], c[:, 0])
    want = sedov_radius(4 * spec.energy, spec.rho, t)
    for a in (0.1, 0.5, 0.785, 1.1, 1.47):
        ray = np.abs(angle - a) < 0.06
        peak = r[ray][np.argmax(rho[ray])]
        assert abs(peak - want) < 0.05 * want, (a, peak, want)
    # The strong-shock compression of gamma 1.4 is 6: the peak approaches it.
    assert 3.5 < rho.max() < 6.5


def test_total_energy_is_conserved_to_rounding_and_stays_internal_plus_kinetic():
    h = Hydro(OneRank(), HydroSpec(zones=12))
    _run_to(h, 0.2)
    kinetic = 0.5 * (h.pm * (h.u[:h.n_own] ** 2).sum(axis=1)).sum()
    assert abs(h.energy - h.energy0) < 1e-12 * h.energy0
    assert h.energy == pytest.approx(h.ze.sum() + kinetic, rel=1e-14)
    assert kinetic > 0.1 * h.energy0 and h.ze.min() >= 0.0


def test_a_changed_energy_breaks_the_invariant():
    h = Hydro(OneRank(), HydroSpec(zones=8))
    h.step()
    assert h.invariant()
    h.ze[5] += 1e-3  # as a flip would, to a zone's energy
    h.step()
    assert not h.invariant()


def test_the_mesh_is_a_quarter_annulus_of_counter_clockwise_quads():
    spec = HydroSpec(zones=6)
    x, zp = make_mesh(spec)
    p = x[zp]
    q = np.roll(p, -1, axis=1)
    area = 0.5 * (p[..., 0] * q[..., 1] - q[..., 0] * p[..., 1]).sum(axis=1)
    assert np.all(area > 0)  # counter-clockwise
    full = np.pi / 4 * (spec.size ** 2) * (1 - 0.05 ** 2)
    assert area.sum() == pytest.approx(full, rel=0.02)  # 6 chords per arc: 1.1 % short
    assert len(np.unique(zp)) == len(x) == (spec.zones + 1) ** 2


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
def test_spans_tile_the_items(size):
    spans = [span(100, size, r) for r in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
