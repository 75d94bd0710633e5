"""Simulation environments (optional extras). ``cdp.envs.pusht`` needs ``pip install 'cdp[pusht]'``."""
