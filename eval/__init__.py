"""Generation and reconstruction metrics (FID and friends), sample grids."""
