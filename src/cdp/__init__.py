"""cdp — Contractive Diffusion Policies (Abyaneh et al., ICLR 2026).

Contraction-regularised diffusion policies for offline reinforcement learning and imitation learning.
"""

__version__ = "0.1.0"
