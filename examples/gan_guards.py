"""Two optimizers, two guards: a tiny GAN whose discriminator meets a NaN batch.

Run: python examples/gan_guards.py
Each optimizer gets its own TorchGuard; the discriminator's bad step is
skipped and leaves D exactly as it was, while the generator trains on.
"""

import torch

import stabilize


def main(steps: int = 6) -> dict:
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    D = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
    opt_g = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
    # One RNG feeds both: neither guard rewinds the other's draws.
    guard_g = stabilize.TorchGuard(G, opt_g, restore_rng=False, on_nonfinite="backoff")
    guard_d = stabilize.TorchGuard(D, opt_d, restore_rng=False, on_nonfinite="backoff")
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for step in range(steps):
        real = torch.randn(16, 3) + 2.0
        if step == 2:
            real[0, 0] = float("nan")  # a corrupt sample reaches the discriminator
        z = torch.randn(16, 2)
        fake = G(z)
        d_loss = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
        guard_d.step(d_loss)
        guard_g.step(bce(D(fake), torch.ones(16, 1)))
        opt_d.zero_grad(set_to_none=True)  # the generator's backward reached D's gradients
    print("discriminator:", guard_d.history.report())
    print("generator:    ", guard_g.history.report())
    return {"d_events": [(e.step, e.action) for e in guard_d.history.events],
            "g_applied": int(guard_g.history.committed.sum())}


if __name__ == "__main__":
    main()
