# Run: ulfmpy run -n 4 --recovery respawn --ckpt-every 20 --inject kill:rank=1,step=60 tests/scenarios/apps/inline_setup.py
"""An inline loop (``ulfmpy.range``) whose set-up code talks: rank 0 reads
the parameters and broadcasts them, scatters the initial field with
``Scatterv``, the ranks swap their neighbour's id with ``Sendrecv`` and
count cells with an object ``allreduce``, and a Cartesian communicator
carries the halo exchange. A replacement runs all of it again with every
answer from the set-up log (fast-forward): the survivors are in the loop
and take no part.

``--params FILE`` is read by rank 0 only, and rank 0 rewrites it at step
30 (another ``alpha``): a replacement that used what it reads now, or that
broadcast live, would compute another result (or wait forever).
``--diverge FILE``: rank 0 creates FILE at step 30, and a set-up that finds
it (a replacement's) makes a call the first run did not (a message to itself).
``--unlogged``: the set-up makes a call ulfmpy passes through unlogged.
"""

import argparse
import hashlib
import json
import os

import numpy as np
from mpi4py import MPI

import ulfmpy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--params", default=None)
    p.add_argument("--diverge", default=None)
    p.add_argument("--unlogged", action="store_true")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    params = None
    if rank == 0:
        params = {"alpha": 0.2, "hot": 1.0}
        if args.params:
            with open(args.params) as f:
                params.update(json.load(f))
    params = comm.bcast(params, root=0)
    if args.unlogged:
        comm.Ibarrier().Wait()  # passed through, not logged: no fast-forward
    if args.diverge and os.path.exists(args.diverge):
        comm.sendrecv("again", dest=rank, source=rank)
    n = args.n
    counts = [(n // size + (r < n % size)) * n for r in range(size)]
    rows = counts[rank] // n
    start = sum(counts[:rank]) // n
    local = np.empty((rows, n))
    whole = None
    if rank == 0:
        x = (np.arange(n) + 0.5) / n
        whole = np.sin(7 * x[:, None]) * np.cos(5 * x[None, :]) * 0.5 + 0.5
    comm.Scatterv([whole, counts, None, MPI.DOUBLE] if rank == 0 else None, local, root=0)
    cells = comm.allreduce(local.size)
    assert cells == n * n, cells
    right, left = (rank + 1) % size, (rank - 1) % size
    neighbour = np.zeros(1, dtype=np.int64)
    comm.Sendrecv(np.array([rank], dtype=np.int64), right, 5, neighbour, left, 5)
    assert neighbour[0] == left
    cart = comm.Create_cart([size], periods=[False])
    up, down = cart.Shift(0, 1)
    u = np.zeros((rows + 2, n))
    u[1:-1] = local
    if up == MPI.PROC_NULL:
        u[0] = params["hot"]
    unew = u.copy()
    alpha = params["alpha"]
    for it in ulfmpy.range(args.steps, state=lambda: {"u": ulfmpy.Block(u[1:-1], (n, n), (start, 0))}):
        reqs = [cart.Irecv(u[0], source=up), cart.Irecv(u[-1], source=down),
                cart.Isend(u[1], dest=up), cart.Isend(u[-2], dest=down)]
        MPI.Request.Waitall(reqs)
        unew[1:-1, 1:-1] = u[1:-1, 1:-1] + alpha * (
            u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1])
        u, unew = unew, u
        if it == 30 and rank == 0:
            if args.params:
                with open(args.params, "w") as f:
                    json.dump({"alpha": 0.1}, f)
            if args.diverge:
                open(args.diverge, "w").close()
    field = comm.gather(u[1:-1].copy(), root=0)
    if rank == 0:
        print("checksum", hashlib.sha256(np.concatenate(field).tobytes()).hexdigest()[:16],
              flush=True)


if __name__ == "__main__":
    with ulfmpy.Runtime(MPI.COMM_WORLD):
        main()
