"""2D heat equation, Jacobi iteration, as mpi4py courses write it.

A Cartesian grid of ranks (``Create_cart``/``Shift``), one layer of ghost
cells, rows and columns exchanged with derived datatypes (subarrays of the
local field), ``Isend``/``Irecv`` with mpi4py's default tags, completed by
``MPI.Request.Waitall``, and the two buffers swapped after every step. The
global edges are held at fixed temperatures. At the end rank 0 prints a
checksum of the whole field.

heat2d_plain.py is the plain program; heat2d.py is the same protected by
ulfmpy, five lines changed; heat2d_inline.py protects the loop where it is,
two lines changed.
Run:  mpirun -n 4 python apps/tutorials/heat2d_plain.py --n 64 --steps 200
      ulfmpy run -n 4 apps/tutorials/heat2d.py --n 64 --steps 200
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI
import ulfmpy.auto


class Heat2D:
    def __init__(self, comm, n):
        dims = MPI.Compute_dims(comm.Get_size(), 2)
        self.cart = comm.Create_cart(dims, periods=[False, False], reorder=True)
        self.n = n
        px, py = self.cart.Get_coords(self.cart.Get_rank())
        self.nx, self.ny = n // dims[0], n // dims[1]
        self.x0, self.y0 = px * self.nx, py * self.ny
        if px == dims[0] - 1:
            self.nx = n - self.x0
        if py == dims[1] - 1:
            self.ny = n - self.y0
        self.up, self.down = self.cart.Shift(0, 1)
        self.left, self.right = self.cart.Shift(1, 1)
        shape = [self.nx + 2, self.ny + 2]

        def block(rows, cols, r0, c0):
            return MPI.DOUBLE.Create_subarray(shape, [rows, cols], [r0, c0]).Commit()

        nx, ny = self.nx, self.ny
        # what this rank sends, and where the neighbours' cells land
        self.send = {"up": block(1, ny, 1, 1), "down": block(1, ny, nx, 1),
                     "left": block(nx, 1, 1, 1), "right": block(nx, 1, 1, ny)}
        self.recv = {"up": block(1, ny, 0, 1), "down": block(1, ny, nx + 1, 1),
                     "left": block(nx, 1, 1, 0), "right": block(nx, 1, 1, ny + 1)}
        x = (np.arange(self.x0 - 1, self.x0 + nx + 1) + 0.5) / n
        y = (np.arange(self.y0 - 1, self.y0 + ny + 1) + 0.5) / n
        self.u = np.exp(-40 * ((x[:, None] - 0.3) ** 2 + (y[None, :] - 0.6) ** 2))
        if px == 0:
            self.u[0, :] = 1.0  # the hot top edge
        if px == dims[0] - 1:
            self.u[-1, :] = 0.0
        self.unew = self.u.copy()

    def step(self):
        u, cart = self.u, self.cart
        reqs = []
        for side, peer in (("up", self.up), ("down", self.down),
                           ("left", self.left), ("right", self.right)):
            reqs.append(cart.Irecv([u, 1, self.recv[side]], source=peer))
            reqs.append(cart.Isend([u, 1, self.send[side]], dest=peer))
        MPI.Request.Waitall(reqs)
        self.unew[1:-1, 1:-1] = u[1:-1, 1:-1] + 0.2 * (
            u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1])
        self.u, self.unew = self.unew, self.u

    def report(self):
        blocks = self.cart.gather((self.x0, self.y0, self.u[1:-1, 1:-1].copy()), root=0)
        if self.cart.Get_rank() == 0:
            field = np.zeros((self.n, self.n))
            for x0, y0, b in blocks:
                field[x0:x0 + b.shape[0], y0:y0 + b.shape[1]] = b
            print("checksum", hashlib.sha256(field.tobytes()).hexdigest()[:16],
                  "mean %.12f" % field.mean(), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    heat = Heat2D(MPI.COMM_WORLD, args.n)
    for it in ulfmpy.range(args.steps, state=lambda: {"u": ulfmpy.Block(heat.u[1:-1, 1:-1], (heat.n, heat.n), (heat.x0, heat.y0))}):
        heat.step()
    heat.report()


if __name__ == "__main__":
    main()
