"""Dynamics of VCPA's Newton steps (a script, not a test): does a training step lower the objective
``L_t = KL(q_t || q_{t-1}) + E_eps L_PA(B; mu + sigma eps) / tau`` that the paper minimises?

1. Synthetic class-structured embeddings (``C`` classes, unit centres, each embedding its centre
   plus Gaussian noise of norm about ``--noise``; a fresh batch of ``B`` per training step). One
   ``VCPALoss`` with the paper's settings trains for ``max(--snapshots)`` steps; at every snapshot
   ``t`` each mode starts from the same state and batch and the table prints ``tau L_t``
   (Monte-Carlo, ``--samples`` fixed draws, summed over classes) after ``m = 0..--steps`` Newton
   steps (:meth:`VCPALoss.newton_path`, the draws training would use): the paper's steps
   (``eta = 1``), damped steps (``eta = --damping``) and the monotone mode
   (``newton_line_search=True``), each stochastic (the paper) and deterministic (``eps = 0``).
   ``rises`` counts the Newton steps that raised the estimate (at all), ``max rise`` is the
   largest relative rise of one step.
2. The largest eigenvalue of ``D^-1 H`` (``H`` the Hessian block of one proxy of the
   ``||p||``-constant surrogate at the deterministic start, ``D`` its diagonal), by
   ``torch.autograd.functional.hessian`` on a surrogate written here: a diagonal Newton step is a
   Jacobi iteration, stable on the local quadratic model only if every eigenvalue lies in
   ``(0, 2)``. ``diag err`` compares the package's closed-form diagonal with autograd's.

    python benchmarks/vcpa_dynamics.py --threads 1
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pml_proxies.losses import VCPALoss  # noqa: E402
from pml_proxies.losses.vcpa_loss import proxy_anchor_newton_terms  # noqa: E402


def batches(num_classes: int, dim: int, batch: int, noise: float, steps: int, seed: int):
    """``steps`` float64 batches of class-structured embeddings (one set of class centres)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=gen, dtype=torch.float64), dim=1)
    out = []
    for _ in range(steps):
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        spread = torch.randn(batch, dim, generator=gen, dtype=torch.float64) / dim**0.5
        out.append((centres[labels] + noise * spread, labels))
    return out


def modes(damping: float) -> dict[str, dict]:
    out = {}
    for stochastic in (True, False):
        kind = "stoch" if stochastic else "det"
        out[f"paper ({kind})"] = {"stochastic": stochastic}
        out[f"damped eta={damping:g} ({kind})"] = {
            "stochastic": stochastic,
            "newton_damping": damping,
        }
        out[f"monotone ({kind})"] = {"stochastic": stochastic, "newton_line_search": True}
    return out


def path_table(args, dim: int) -> list[list[str]]:
    data = batches(args.classes, dim, args.batch, args.noise, max(args.snapshots) + 1, args.seed)
    rows = []
    shown = [m for m in (0, 1, 2, 3, 5, 10, 20, 30) if m <= args.steps]
    for stochastic in (True, False):
        trainer = VCPALoss(
            args.classes, dim, temperature=args.temperature, stochastic=stochastic, seed=args.seed
        ).double()
        done = 0
        for t in sorted(args.snapshots):
            while done < t - 1:  # the state after t - 1 training steps
                trainer(*data[done])
                done += 1
            emb, labels = data[t - 1]
            for name, options in modes(args.damping).items():
                if options["stochastic"] != stochastic:
                    continue
                loss = VCPALoss(
                    args.classes, dim, temperature=args.temperature, seed=0, **options
                ).double()
                loss.load_state_dict(trainer.state_dict())
                path = loss.newton_path(emb, labels, args.steps, args.samples, seed=args.seed)
                change = path[1:] / path[:-1] - 1
                rises = int((change > 0).sum())
                rows.append(
                    [str(dim), name, str(t)]
                    + [f"{float(path[m]):.3f}" for m in shown]
                    + [
                        f"{rises}/{args.steps}",
                        f"{100 * max(float(change.max()), 0.0):.2g}%",
                        f"{float(path[-1] / path[0]):.3f}",
                    ]
                )
    header = ["D", "mode", "t"] + [f"m={m}" for m in shown]
    header += ["rises", "max rise", "end/start"]
    return [header] + rows


def surrogate_block(p, x, labels, c, norm, mean_prev, var_prev, alpha, margin, tau, num_classes):
    """``L_t`` as a function of proxy ``c`` alone, ``||p||`` held at ``norm`` (deterministic)."""
    present = len(torch.unique(labels))
    s = x @ p / norm
    pos, neg = labels == c, labels != c
    pos_term = torch.log1p(torch.exp(alpha * (margin - s[pos])).sum()) / present
    neg_term = torch.log1p(torch.exp(alpha * (s[neg] + margin)).sum()) / num_classes
    kl = 0.5 * ((p - mean_prev) ** 2 / var_prev).sum()
    return kl + (pos_term + neg_term) / tau


def eigen_table(args) -> list[list[str]]:
    dim = args.eig_dim
    emb, labels = batches(args.classes, dim, args.batch, args.noise, 1, args.seed)[0]
    x = F.normalize(emb, dim=1)
    loss = VCPALoss(
        args.classes, dim, temperature=args.temperature, stochastic=False, seed=args.seed
    ).double()
    mean = loss.proxy_mean
    var_prev = loss.proxy_std.square()
    grad, hess = proxy_anchor_newton_terms(
        x, labels, mean, loss.alpha, loss.margin, scale=1.0 / loss.temperature
    )
    rows = [["D", "tau", "proxy", "lambda_max(D^-1 H)", "eigenvalues > 2", "diag err"]]
    for c in labels.unique()[: args.eig_proxies].tolist():
        norm = mean[c].norm().detach()

        def f(p, c=c, norm=norm):
            return surrogate_block(
                p, x, labels, c, norm, mean[c], var_prev[c], loss.alpha, loss.margin,
                loss.temperature, args.classes,
            )  # fmt: skip

        h = torch.autograd.functional.hessian(f, mean[c].clone())
        diag = h.diagonal()
        scaled = h / torch.sqrt(diag.unsqueeze(0) * diag.unsqueeze(1))  # D^-1/2 H D^-1/2
        eig = torch.linalg.eigvalsh(scaled)
        closed = 1.0 / var_prev[c] + hess[c]
        err = float(((closed - diag).abs() / diag.abs()).max())
        rows.append(
            [str(dim), f"{loss.temperature:g}", str(c), f"{float(eig.max()):.2f}",
             str(int((eig > 2).sum())), f"{err:.1e}"]
        )  # fmt: skip
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--dims", type=ints, default=[512, 128], help="embedding sizes D")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--noise", type=float, default=1.0, help="norm of the per-sample noise")
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--damping", type=float, default=0.25)
    parser.add_argument("--snapshots", type=ints, default=[1, 10, 50], help="training steps t")
    parser.add_argument("--steps", type=int, default=30, help="Newton steps m shown")
    parser.add_argument("--samples", type=int, default=16, help="fixed eps draws of the estimate")
    parser.add_argument("--eig-dim", type=int, default=128)
    parser.add_argument("--eig-proxies", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"C={args.classes} B={args.batch} tau={args.temperature} noise={args.noise} "
        f"S={args.samples} seed={args.seed} torch={torch.__version__}\n"
    )
    print("tau * L_t (Monte-Carlo) after m Newton steps of training step t, float64")
    rows: list[list[str]] = []
    for dim in args.dims:
        table = path_table(args, dim)
        rows += table if not rows else table[1:]
    print_table(rows)
    print(f"\nJacobi stability at the deterministic start (D = {args.eig_dim})")
    print_table(eigen_table(args))


if __name__ == "__main__":
    main()
