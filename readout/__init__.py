"""readout: information bottlenecks for attribution."""
