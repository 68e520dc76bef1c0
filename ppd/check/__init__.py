"""Checks of the real-scale configurations on this machine: every cluster preset against the real checkpoints'
layouts (meta device + reduced-depth copies), no download."""
