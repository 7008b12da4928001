"""Physics forward model and the simulated Nanonis controller."""
