"""devices/: device profiles, measured results, and the roofline model of tokens/s."""
