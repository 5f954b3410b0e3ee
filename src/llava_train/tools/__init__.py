"""Tools built on the library: bench, memory plan, sweeps, the demo and the sample trace (typed, no argparse)."""
