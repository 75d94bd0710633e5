"""Add the contraction regulariser to your own diffusion model (needs only the core install: torch + numpy + cdp)."""
import torch
from cdp.schedules import NoiseSchedule
from cdp.contraction import ContractionConfig, ContractionRegularizer

T = 100
schedule = NoiseSchedule(name="cosine", num_steps=T)            # your training schedule (t = k / T in [0, 1])
# or, for a diffusers scheduler: schedule = NoiseSchedule.from_diffusers(DDPMScheduler(...)) (cdp step k = its k - 1)
reg = ContractionRegularizer(ContractionConfig(weight=0.1, margin=0.1, t_range=(0.0, 1.0)), schedule)


class Denoiser(torch.nn.Module):                                  # any (noisy_action, t, condition) -> ε̂ network
    def __init__(self, da: int, dc: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(da + 1 + dc, 64), torch.nn.SiLU(), torch.nn.Linear(64, da))

    def forward(self, a, t, cond):
        return self.net(torch.cat([a, t[:, None], cond], -1))


def train_step(net, a0, cond):                                    # a0: (B, Da) or (B, H, Da) normalised actions
    k = torch.randint(1, T + 1, (a0.shape[0],))
    noise = torch.randn_like(a0)
    loss_d = ((net(schedule.add_noise(a0, noise, k), k / T, cond) - noise) ** 2).mean()
    loss_c, metrics = reg.loss_from_clean(net, a0, cond)          # γ·L_c, metrics["lambda_max_mean"], ...
    return loss_d + loss_c, metrics


torch.manual_seed(0)
net = Denoiser(da=2, dc=3)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
cond = torch.randn(256, 3)
a0 = torch.tanh(cond[:, :2] + 0.1 * torch.randn(256, 2))         # toy demonstrations: action ≈ f(observation)
for step in range(50):
    loss, metrics = train_step(net, a0, cond)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"regularizer example: steps=50 loss={loss.item():.4f} lambda_max_mean={metrics['lambda_max_mean']:.4f} "
      f"frac_contractive={metrics['frac_contractive']:.2f}")
