"""End-to-end jobs built on the config tree: :mod:`.toy` (cdp toy), :mod:`.il` (cdp train / cdp eval), :mod:`.rl` (cdp rl)."""
