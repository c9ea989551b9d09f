"""The circuit app on one rank against a reference computed another way:
plain Python loops over wires and nodes, from the same generated circuit."""

from __future__ import annotations

import numpy as np
import pytest

from apps.circuit import DT, QUANTUM, SWEEPS, Circuit, CircuitSpec, generate_piece, owner_pieces

SPEC = CircuitSpec(pieces=3, nodes=5, wires=7, segments=3, cross=0.4, seed=11)


class OneRank:
    """A communicator of one rank: the app sends nothing."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1


def reference(spec: CircuitSpec, steps: int) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """The circuit stepped wire by wire and node by node in Python floats."""
    parts = [generate_piece(spec, p) for p in range(spec.pieces)]
    cat = {k: [x for part in parts for x in part[k].tolist()] for k in parts[0]}
    s = spec.segments
    volt = list(cat["voltage"])
    cur = [[0.0] * s for _ in range(spec.total_wires)]
    vint = [[0.0] * (s - 1) for _ in range(spec.total_wires)]
    for _ in range(steps):
        for w in range(spec.total_wires):
            r, l, c = cat["resistance"][w], cat["inductance"][w], cat["wire_cap"][w]
            vin, vout = volt[cat["in_node"][w]], volt[cat["out_node"][w]]
            for _ in range(SWEEPS):
                pts = [vin, *vint[w], vout]
                for k in range(s):
                    cur[w][k] = (cur[w][k] + (pts[k] - pts[k + 1]) * (DT / l)) / (1.0 + DT * r / l)
                for k in range(s - 1):
                    vint[w][k] += (cur[w][k] - cur[w][k + 1]) * (DT / c)
        charge = [0] * spec.total_nodes
        for w in range(spec.total_wires):
            charge[cat["in_node"][w]] -= int(round(cur[w][0] * (DT / QUANTUM)))
            charge[cat["out_node"][w]] += int(round(cur[w][-1] * (DT / QUANTUM)))
        for n in range(spec.total_nodes):
            volt[n] += charge[n] * (QUANTUM / cat["node_cap"][n])
            volt[n] *= 1.0 - cat["leakage"][n]
    return volt, cur, vint


def test_one_rank_matches_the_loop_reference_bit_for_bit():
    app = Circuit(OneRank(), SPEC)
    steps = 6
    for _ in range(steps):
        app.step()
    volt, cur, vint = reference(SPEC, steps)
    assert app.voltage[:app.n_own].tolist() == volt
    assert app.current.tolist() == cur
    assert app.v_int.tolist() == vint
    assert np.all(np.isfinite(app.voltage))


def test_the_circuit_is_the_same_piece_by_piece_whoever_generates_it():
    a, b = generate_piece(SPEC, 2), generate_piece(SPEC, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(generate_piece(SPEC, 1)["voltage"], a["voltage"])
    # Wires start in their piece; crossing ones end in another.
    assert np.all(a["in_node"] // SPEC.nodes == 2)
    assert np.any(a["out_node"] // SPEC.nodes != 2)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
def test_pieces_are_dealt_out_whole_and_in_order(size):
    spans = [owner_pieces(24, size, r) for r in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == 24
    assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(spans, spans[1:]))


def test_too_few_pieces_for_the_ranks_is_a_clear_error():
    import ulfmpy

    class Six(OneRank):
        def Get_size(self) -> int:
            return 6

    with pytest.raises(ulfmpy.ConfigError, match="pieces"):
        Circuit(Six(), CircuitSpec(pieces=4, nodes=3, wires=3))
