"""The research harness beside the product: full-size runs and measurements; flowpress never imports it."""
